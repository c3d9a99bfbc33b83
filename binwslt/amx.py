"""The exact backward GEMMs of a stride-1 convolution over spikes on AMX-BF16 (binwslt/csrc/amx_conv.cpp).

grad-input = g ⋆ ternary weight and grad-weight = spikesᵀ ⋆ g, with the fp32 gradient g split into `TERMS` bf16
terms (``t1 = bf16(g)``, ``t2 = bf16(g - t1)``, ``t3 = bf16(g - t1 - t2)``: together g to 2^-24, fp32's precision),
the other operand exact in bf16 (-1/0/+1, 0/1), every product exact and AMX accumulating in fp32 with an fp32
output: the accuracy of an fp32 convolution, on the tile unit. (PyTorch's own CPU bf16 convolutions round their
output to bf16, which is why this is a kernel of its own.) Implicit GEMMs: per frame the padded operands are
staged in a thread-local, L2-sized buffer in the layouts the tile loads read (folded and split once for both
GEMMs); nothing of size of g is copied.

Used by the ``torch`` backend where `available` (the CPU has AMX-BF16, Linux grants the tile state, the extension
builds, ``BINWSLT_CPU_MATMUL`` is not ``fp32``) for stride-1 square kernels with padding < kernel size; other
layers, and CPUs without AMX, run fp32 convolutions.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from . import _cpu_ext, cpu

TERMS = 3  # bf16 terms of g: three reach fp32 precision (two lose ~2^-17 relative)
_SOURCE = Path(__file__).parent / "csrc" / "amx_conv.cpp"
_state = {}


class Fold(NamedTuple):
    """The backward's per-output-channel fold, applied to g as the kernels stage it (no pass of its own):
    ``g·c1`` (a plain scale: ``c2``, ``c3``, ``y`` None) or BatchNorm's ``(g·c1 + c3) + y·c2`` with the layer's
    pre-activation ``y`` ``[F, C_out, OH, OW]`` (int16/int32/float32, any strides); vectors ``[C_out]`` float32.
    Bit-identical to binwslt/csrc/lif_scan.cpp's ``epilogue_fold`` (the same operations in the same order)."""
    y: Optional[torch.Tensor] = None
    c1: Optional[torch.Tensor] = None
    c2: Optional[torch.Tensor] = None
    c3: Optional[torch.Tensor] = None


def _load():
    if "module" not in _state:
        module = None
        if "amx_bf16" in cpu.cpu_flags() and os.environ.get("BINWSLT_NO_CPP_EXT") != "1":
            try:
                module = _cpu_ext.build_extension("binwslt_amx_conv", [_SOURCE])
                if not module.amx_available():  # the kernel did not grant the tile state
                    module = None
            except Exception as err:  # no compiler: the fp32 convolutions are correct
                warnings.warn(f"binwslt: the AMX backward convolutions are not available ({str(err)[-300:]}); "
                              "using fp32 convolutions", RuntimeWarning)
        _state["module"] = module
    return _state["module"]


def available() -> bool:
    """True when the backward convolutions of eligible layers run here (see the module docstring)."""
    return cpu.matmul_mode() != "fp32" and _load() is not None


def eligible(weight_shape, stride, padding) -> bool:
    """Whether a conv of ``weight_shape`` ``[C_out, C_in, k, k]`` with ``stride``/``padding`` (pairs) fits the
    kernels: stride 1, a square kernel, equal padding below the kernel size."""
    k = weight_shape[2]
    return tuple(stride) == (1, 1) and weight_shape[3] == k and padding[0] == padding[1] and 0 <= padding[0] < k


def pack_weight(ternary: torch.Tensor) -> torch.Tensor:
    """The ternary weight ``[C_out, C_in, k, k]`` (any integer or float dtype) as the grad-input kernel reads it:
    bf16 ``[k·k, C_in32/16, C_out32/2, 16, 2]`` (channels padded to multiples of 32, pairs of output channels
    interleaved, in blocks of 16 input channels: every tile the kernel loads is contiguous)."""
    return _load().pack_weight(ternary.to(torch.bfloat16))


def conv_grads(grad: torch.Tensor, input_shape, kernel_size: int, padding: int, *,
               packed: Optional[torch.Tensor] = None, bits: Optional[torch.Tensor] = None,
               channels_last: bool = False, scale: float = 1.0, fold: Optional[Fold] = None,
               overwrite_grad: bool = False):
    """The backward of ``y = conv2d(x, W, stride 1, padding)`` for input frames of ``input_shape``
    ``[F, C_in, H, W]``, from ``grad`` = dL/dy ``[F, C_out, OH, OW]`` fp32 (any strides; with ``fold``, dL/dy is
    ``fold`` applied to ``grad``, see `Fold`), in one pass that stages each frame's g once.

    Returns ``(grad_input, grad_weight)``: ``scale`` · dL/dx ``[F, C_in, H, W]`` fp32 (channels-last) where
    ``packed`` = `pack_weight` (W) is given, else None; dL/dW ``[C_out, C_in, k, k]`` fp32 where the input
    spikes are given as ``bits`` (uint8, `binwslt.bits.pack_bits` of the frames in memory order: ``[F, H, W, C_in]``
    with ``channels_last``, else ``[F, C_in, H, W]``; read as they are, nothing unpacked), else None.
    ``overwrite_grad``: write grad_input over ``grad``'s memory (no fresh pages; ``grad`` must be channels-last of
    grad_input's shape, and is not valid afterwards).
    """
    if packed is None and bits is None:
        raise ValueError("conv_grads: give packed (for grad_input), bits (for grad_weight) or both")
    _, c_in, h, w = input_shape
    grad_input, grad_weight = _load().conv_grads(bits, bool(channels_last), grad, packed, bool(overwrite_grad), c_in,
                                                 h, w, kernel_size, padding, TERMS, float(scale), *(fold or Fold()))
    return (grad_input if packed is not None else None), (grad_weight if bits is not None else None)
