"""Side-by-side timing: the implementations of one case take turns, round by round.

On a shared machine the load drifts over seconds; timing A's rounds, then B's, lets the drift land on one of
them. Interleaving (A B C, B C A, C A B, ...) spreads it over all, so their ratios stay honest. Each callable
synchronises its own device before returning (`cases.Runner` does).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List


def interleaved(fns: Dict[str, Callable[[], object]], *, rounds: int, warmup: int = 1,
                budget_s: float = float("inf"), min_rounds: int = 3) -> Dict[str, List[float]]:
    """Seconds per call of each of ``fns``, measured round-robin.

    ``warmup`` untimed calls each first; then up to ``rounds`` rounds, stopping early once ``budget_s`` seconds
    have been spent in timed rounds and at least ``min_rounds`` rounds are done. Returns ``{name: [seconds]}``.
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds must be >= 1 and warmup >= 0, got rounds={rounds}, warmup={warmup}")
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: Dict[str, List[float]] = {name: [] for name in names}
    spent = 0.0
    for r in range(rounds):
        if r >= min_rounds and spent >= budget_s:
            break
        k = r % len(names) if names else 0
        for name in names[k:] + names[:k]:
            start = time.perf_counter()
            fns[name]()
            elapsed = time.perf_counter() - start
            times[name].append(elapsed)
            spent += elapsed
    return times


def summary(seconds: List[float]) -> dict:
    """Median, min and max in milliseconds, and the number of rounds."""
    if not seconds:
        return {"median_ms": None, "min_ms": None, "max_ms": None, "rounds": 0}
    ms = [s * 1e3 for s in seconds]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "rounds": len(ms)}
