"""The LIF neuron's configuration (design.md §2)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

SURROGATE_DEFAULT_ALPHA = {"atan": 2.0, "sigmoid": 4.0, "triangle": 1.0}


@dataclass(frozen=True)
class LIFConfig:
    """Leaky integrate-and-fire neuron, multi-step, time-major.

    ``U[t] = decay*V[t-1] + I[t]`` (or ``+ (1-decay)*I[t]`` with ``decay_input=True``), ``S[t] = U[t] >= threshold``,
    hard reset to ``v_reset`` or, with ``v_reset=None``, soft reset ``V[t] = U[t] - threshold*S[t]``.
    ``decay`` is the paper's λ = e^{-1/τ}; SpikingJelly's ``LIFNode(tau=1/(1-decay))`` is the same neuron when
    ``v_reset`` is 0 or None. ``surrogate`` names dS/dU for BPTT ("atan", "sigmoid", "triangle"); ``alpha`` is its
    sharpness, ``None`` taking the surrogate's default (atan 2, sigmoid 4, triangle 1). ``detach_reset`` treats S as
    a constant inside the reset.
    """

    decay: float = 0.99
    threshold: float = 1.0
    v_reset: Optional[float] = 0.0
    decay_input: bool = False
    surrogate: str = "atan"
    alpha: Optional[float] = None
    detach_reset: bool = False

    def __post_init__(self):
        if not isinstance(self.surrogate, str) or self.surrogate not in SURROGATE_DEFAULT_ALPHA:
            raise ValueError(
                f"surrogate must be one of {sorted(SURROGATE_DEFAULT_ALPHA)}, got {self.surrogate!r}")
        if self.alpha is None:
            object.__setattr__(self, "alpha", SURROGATE_DEFAULT_ALPHA[self.surrogate])
        for name in ("decay", "threshold", "alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {self.decay!r}")
        if self.threshold <= 0.0:
            raise ValueError(f"threshold must be > 0, got {self.threshold!r}")
        if self.alpha <= 0.0:
            raise ValueError(f"alpha must be > 0, got {self.alpha!r}")
        if self.v_reset is not None:
            if isinstance(self.v_reset, bool) or not isinstance(self.v_reset, (int, float)) \
                    or not math.isfinite(self.v_reset):
                raise ValueError(f"v_reset must be a finite number or None (soft reset), got {self.v_reset!r}")
            if self.v_reset >= self.threshold:
                raise ValueError(f"v_reset must be below threshold={self.threshold}, got {self.v_reset!r}")
            object.__setattr__(self, "v_reset", float(self.v_reset))
        for name in ("decay_input", "detach_reset"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def input_gain(self) -> float:
        """The factor on I[t]: 1 - decay with ``decay_input``, else 1."""
        return 1.0 - self.decay if self.decay_input else 1.0

    def to_dict(self) -> dict:
        """Plain dict of the fields (JSON-serialisable)."""
        return asdict(self)
