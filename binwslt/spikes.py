"""What counts as a spike tensor, decided without reading its values, and the dtype spikes come out in.

Every backend and kernel launcher asks :func:`is_spikes` instead of scanning values: a tensor is spikes when its
dtype says so (bool, uint8, int8) or when a fused layer produced it and marked it with :func:`mark_spikes`. A
float tensor that was not marked is treated as analog input (the exact but slower path), whatever its values.

A float spike tensor may also carry the same spikes as uint8 (`attach_uint8`, written by the CPU epilogue in the
same pass), which the next layer's int8 GEMM reads instead of casting; `uint8_spikes` returns it only while the
float tensor has not been modified in place since.
"""
from __future__ import annotations

from typing import Optional

import torch

SPIKE_DTYPES = (torch.bool, torch.uint8, torch.int8)
_MARK = "_binwslt_spikes"
_UINT8 = "_binwslt_uint8"


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


def attach_uint8(t: torch.Tensor, u8: torch.Tensor) -> torch.Tensor:
    """Attach ``u8`` (uint8, ``t``'s shape and strides, the same 0/1 values) to the spike tensor ``t``; returns ``t``.
    Not for inference tensors (no version counter to tell an in-place change): ``t`` is returned unchanged."""
    if u8.shape != t.shape or u8.stride() != t.stride() or u8.dtype != torch.uint8:
        raise ValueError(f"u8 must be uint8 with t's shape {tuple(t.shape)} and strides {t.stride()}, got "
                         f"{u8.dtype} {tuple(u8.shape)} {u8.stride()}")
    if not t.is_inference():
        setattr(t, _UINT8, (u8, t._version))
    return t


def uint8_spikes(t: torch.Tensor) -> Optional[torch.Tensor]:
    """The uint8 copy attached to ``t`` by `attach_uint8` (same shape and strides), or None when there is none or
    ``t`` was modified in place since."""
    entry = getattr(t, _UINT8, None)
    if entry is None or t.is_inference() or entry[1] != t._version:
        return None
    return entry[0]
