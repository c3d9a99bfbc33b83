"""The CPU backend's targets (issue 11) in one process: Conv-4 training step and eval forward, ratios interleaved.

    python -m benchmarks.cpu_step --out benchmarks/results/cpu-step-<date>.json [--rounds 5]

Training step (T=4, N=32, 32×32): ``torch`` (auto forward GEMM, int8 where the CPU has it), ``torch-fp32``
(the same with ``BINWSLT_CPU_MATMUL=fp32``: a CPU without int8/bf16 dot products), ``reference``, SpikingJelly
fp32 and under bf16 autocast, the fp32 floor and the bf16 channels-last floor with a two-term backward
(benchmarks/cases.py). Eval forward (``torch.no_grad``) at N=32 and N=128: ``torch`` against SpikingJelly fp32.
Memory: bytes saved for backward by one step, and the step's peak memory: the resident memory one training step
adds at its peak, each implementation in a fresh process (``--peak IMPL``) whose malloc gives every block over
64 KiB back to the system when freed, after two warm-up steps (benchmarks/memory.py). ``uptime`` load is recorded before and
after, with `binwslt.cpu_info`. Writes the JSON (atomically) and a Markdown table beside it (``.md``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import gc
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from binwslt import cpu as binwslt_cpu

from .cases import model_runner
from .memory import step_peak_bytes
from .shapes import ModelCase
from .timing import interleaved, summary

STEP_IMPLS = ("torch", "torch-fp32", "reference", "spikingjelly", "spikingjelly-bf16", "floor", "floor-bf16")
TARGETS = (  # (label, numerator impl, denominator impl, mode, bound): ratio = time(denominator) / time(numerator)
    ("train: torch >= 3x faster than SpikingJelly fp32", "torch", "spikingjelly", "train", 3.0),
    ("train: torch >= 1.5x faster than SpikingJelly bf16 autocast", "torch", "spikingjelly-bf16", "train", 1.5),
    ("train: torch >= 4x faster than reference", "torch", "reference", "train", 4.0),
)


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


class _Forced:
    """A runner whose calls run with ``BINWSLT_CPU_MATMUL`` set to ``mode``."""

    def __init__(self, runner, mode: str):
        self.runner, self.mode = runner, mode

    def _with_mode(self, fn):
        old = os.environ.get(binwslt_cpu.ENV_VAR)
        os.environ[binwslt_cpu.ENV_VAR] = self.mode
        try:
            return fn()
        finally:
            if old is None:
                os.environ.pop(binwslt_cpu.ENV_VAR, None)
            else:
                os.environ[binwslt_cpu.ENV_VAR] = old

    def train_step(self):
        return self._with_mode(self.runner.train_step)

    def infer(self):
        return self._with_mode(self.runner.infer)

    def saved_bytes(self):
        return self._with_mode(self.runner.saved_bytes)


def _runner(impl: str, case: ModelCase):
    if impl == "torch-fp32":
        return _Forced(model_runner("torch", case, "cpu"), "fp32")
    return model_runner(impl, case, "cpu")


PEAK_IMPLS = ("torch", "reference", "spikingjelly")
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024), "MALLOC_TRIM_THRESHOLD_": str(64 * 1024)}


def peak_in_this_process(impl: str) -> int:
    """The Conv-4 training step's peak memory (bytes) for ``impl``, measured in this process (``--peak``)."""
    runner = _runner(impl, ModelCase("conv4", 4, 32))
    for _ in range(2):
        runner.train_step()
    gc.collect()
    return step_peak_bytes(runner.train_step)


def peak_bytes(impl: str) -> int:
    """``peak_in_this_process(impl)`` in a fresh interpreter with ``MALLOC_ENV`` set; returns bytes."""
    env = {**os.environ, **MALLOC_ENV}
    out = subprocess.run([sys.executable, "-m", "benchmarks.cpu_step", "--peak", impl], env=env, check=True,
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent).stdout
    return int(out.split()[-1])


def _median(entry, impl):
    return entry["times"][impl]["median_ms"]


def run(rounds: int) -> dict:
    """Every measurement of the module docstring; returns the JSON-ready dict."""
    result = {"command": "python -m benchmarks.cpu_step " + " ".join(sys.argv[1:]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": platform.processor() or platform.machine(), "cpu": binwslt_cpu.cpu_info(),
              "torch": torch.__version__, "load_before": _load(), "cases": {}}
    step_case = ModelCase("conv4", 4, 32)
    runners = {impl: _runner(impl, step_case) for impl in STEP_IMPLS}
    times = interleaved({impl: r.train_step for impl, r in runners.items()}, rounds=rounds, warmup=1)
    entry = {"label": step_case.label + " training step", "times": {k: summary(v) for k, v in times.items()},
             "saved_bytes": {impl: runners[impl].saved_bytes() for impl in ("torch", "reference", "spikingjelly")}}
    del runners
    entry["peak_bytes"] = {impl: peak_bytes(impl) for impl in PEAK_IMPLS}
    entry["load_after"] = _load()
    result["cases"]["train"] = entry
    for batch in (32, 128):
        case = ModelCase("conv4", 4, batch)
        runners = {impl: _runner(impl, case) for impl in ("torch", "torch-fp32", "spikingjelly")}
        times = interleaved({impl: r.infer for impl, r in runners.items()}, rounds=rounds, warmup=1)
        result["cases"][f"eval{batch}"] = {"label": case.label + " eval forward",
                                          "times": {k: summary(v) for k, v in times.items()}, "load_after": _load()}
        del runners
    result["targets"] = targets(result)
    return result


def targets(result: dict) -> list:
    """Each target with its measured ratio and whether it holds."""
    train = result["cases"]["train"]
    rows = []
    for label, num, den, _, bound in TARGETS:
        ratio = _median(train, den) / _median(train, num)
        rows.append({"target": label, "measured": round(ratio, 2), "met": ratio >= bound})
    floor = _median(train, "torch") / _median(train, "floor-bf16")
    rows.append({"target": "train: torch within 1.5x of the bf16 channels-last two-term floor",
                 "measured": round(floor, 2), "met": floor <= 1.5})
    for batch in (32, 128):
        e = result["cases"][f"eval{batch}"]
        ratio = _median(e, "spikingjelly") / _median(e, "torch")
        rows.append({"target": f"eval N={batch}: torch >= 5x faster than SpikingJelly fp32",
                     "measured": round(ratio, 2), "met": ratio >= 5.0})
    saved = train["saved_bytes"]
    mem = saved["torch"] / saved["spikingjelly"]
    rows.append({"target": "train: bytes saved for backward <= 0.4x SpikingJelly's", "measured": round(mem, 3),
                 "met": mem <= 0.4})
    peak = train["peak_bytes"]["torch"] / train["peak_bytes"]["spikingjelly"]
    rows.append({"target": "train: peak memory of the step <= 0.4x SpikingJelly's", "measured": round(peak, 3),
                 "met": peak <= 0.4})
    fp32 = _median(train, "torch-fp32") / _median(train, "torch")
    rows.append({"target": "fp32 forward path (BINWSLT_CPU_MATMUL=fp32): time relative to auto",
                 "measured": round(fp32, 2), "met": None})
    return rows


def markdown(result: dict) -> str:
    """The table for the README / benchmarks/results: per-implementation medians, then the targets."""
    lines = [f"`{result['command']}` — {result['date']}, torch {result['torch']}, "
             f"{binwslt_cpu.cpu_info_line()}; load (1/5/15 min) before {result['load_before']}, after "
             f"{result['cases']['eval128']['load_after']}", ""]
    for key, entry in result["cases"].items():
        base = _median(entry, "torch")
        lines += [f"**{entry['label']}**", "", "| implementation | median ms | rounds | time / torch |",
                  "|---|---|---|---|"]
        for impl, t in entry["times"].items():
            lines.append(f"| {impl} | {t['median_ms']:.0f} | {t['rounds']} | {t['median_ms'] / base:.2f} |")
        lines.append("")
    lines += ["| target (issue 11) | measured | met |", "|---|---|---|"]
    for row in result["targets"]:
        met = "—" if row["met"] is None else ("yes" if row["met"] else "**no**")
        lines.append(f"| {row['target']} | {row['measured']} | {met} |")
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def arguments(doc: str) -> argparse.ArgumentParser:
    """The command line these CPU benchmarks share: ``--out`` (JSON path) and ``--rounds``."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON path (a .md table is written beside it)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds per case (default 5)")
    return parser


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--peak"]:
        if len(argv) != 2 or argv[1] not in PEAK_IMPLS:
            raise SystemExit(f"--peak takes one of {PEAK_IMPLS}, got {argv[1:]!r}")
        print(peak_in_this_process(argv[1]))
        return 0
    args = arguments(__doc__).parse_args(argv)
    result = run(args.rounds)
    save(args.out, result, markdown(result))
    return 0


def save(out: Path, result: dict, table: str) -> None:
    """``result`` as JSON at ``out`` and the Markdown ``table`` beside it (``.md``), atomically; prints the table."""
    _write(out, json.dumps(result, indent=1) + "\n")
    _write(out.with_suffix(".md"), table)
    print(table)



if __name__ == "__main__":
    raise SystemExit(main())
