"""What counts as a spike tensor, decided without reading its values, and the dtype spikes come out in.

Every backend and kernel launcher asks :func:`is_spikes` instead of scanning values: a tensor is spikes when its
dtype says so (bool, uint8, int8) or when a fused layer produced it and marked it with :func:`mark_spikes`. A
float tensor that was not marked is treated as analog input (the exact but slower path), whatever its values.
"""
from __future__ import annotations

import torch

SPIKE_DTYPES = (torch.bool, torch.uint8, torch.int8)
_MARK = "_binwslt_spikes"


def mark_spikes(t: torch.Tensor) -> torch.Tensor:
    """Mark ``t`` (any shape, any dtype) as holding only 0/1 spikes; returns ``t`` itself."""
    setattr(t, _MARK, True)
    return t


def is_spikes(t: torch.Tensor) -> bool:
    """True when ``t`` holds spikes by dtype (bool/uint8/int8) or by a fused layer's mark; never reads values."""
    return t.dtype in SPIKE_DTYPES or getattr(t, _MARK, False)


def spike_output_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """The dtype of a fused layer's output spikes: x's floating dtype, float32 when x is bool/uint8/int8.

    The one rule on every backend: scale, shift, residual and score dtypes never change it.
    """
    return torch.float32 if x_dtype in SPIKE_DTYPES else x_dtype
