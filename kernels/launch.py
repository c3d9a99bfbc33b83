"""Host helpers shared by the fused conv + LIF and linear + LIF launchers (kernels/conv_lif.py, linear_lif.py).

Everything here runs on the host without reading tensor values: no ``.item()``, no ``int(tensor)``, no value
scans, so a layer's forward and backward never synchronise with the device. The BatchNorm formulas themselves
live in binwslt/batchnorm.py; these helpers only feed it the kernels' partial sums and turn its results into the
contiguous fp32 per-channel vectors the kernels read.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from binwslt import batchnorm
from binwslt.spikes import is_spikes
from binwslt.subnet import Subnet, derived  # noqa: F401  (derived: re-exported for the launchers)

INT32_LIMIT = 2 ** 31 - 1


def check_int32(op: str, **sizes: int) -> None:
    """Raise ValueError naming the tensor when one of ``sizes`` (name -> element count) exceeds int32 indexing."""
    for name, numel in sizes.items():
        if numel > INT32_LIMIT:
            raise ValueError(f"{name} has {numel} elements; the Triton {op} kernels index it with int32 offsets "
                             f"(at most {INT32_LIMIT})")


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sms(device: torch.device) -> Optional[int]:
    """The SM count the tile policy fills grids to (kernels/tiles.py): the CUDA device's, None on CPU (the
    interpreter, where every shape gets exactly one config)."""
    if device.type != "cuda":
        return None
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def device_arch(device: torch.device) -> Optional[int]:
    """The CUDA device's compute capability as an int (80 for sm_80, 90 for sm_90), None on CPU: the tile policy
    picks per-arch pipeline depths from it (kernels/tiles.py)."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def channel_vec(v: Optional[torch.Tensor], channels: int, fill: float, device) -> torch.Tensor:
    """Contiguous fp32 ``[channels]`` copy of ``v`` (detached), or ``fill`` everywhere when ``v`` is None."""
    if v is None:
        return torch.full((channels,), fill, dtype=torch.float32, device=device)
    return v.detach().to(torch.float32).contiguous()


def f32(v: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``v`` detached as fp32 (None stays None)."""
    return None if v is None else v.detach().to(torch.float32)


def y_dtype(is_spike: bool, fan_in: int) -> torch.dtype:
    """Storage dtype of the exact pre-activation y: int16 for spikes while the fan-in bounds |y| by 32767, int32
    beyond; fp32 for analog input."""
    if not is_spike:
        return torch.float32
    return torch.int16 if fan_in <= 32767 else torch.int32


def bn_forward(stats: torch.Tensor, frames: int, count: int, alpha: torch.Tensor, scale, shift, running_mean,
               running_var, momentum: float, eps: float):
    """Training BatchNorm from the forward kernel's partial sums.

    stats: ``[2, programs, C]`` per-program sums of y and y² (int64 for spikes: exact); frames: values per channel
    the sums cover (T_y·rows); count: values per channel BatchNorm counts (T·rows: a direct-encoded input counts its
    T copies). Updates the running statistics in place. Returns ``(a, b, bn)``: the contiguous fp32 per-channel
    affine of the current ``I = a·(α·y) + b`` and the :class:`binwslt.batchnorm.BatchStats`.
    """
    sums = stats.sum(dim=1)
    mean, var = batchnorm.stats_from_sums(sums[0], sums[1], frames, alpha)
    bn = batchnorm.train_rstd(mean, var, count, running_mean, running_var, momentum, eps)
    gain, bias = batchnorm.current_affine(f32(scale), f32(shift), bn)
    return gain.contiguous(), bias.contiguous(), bn


def plain_affine(scale, shift, channels: int, device):
    """``(a, b)`` of the current without BatchNorm: scale (1) and shift (0) as contiguous fp32 ``[channels]``."""
    return channel_vec(scale, channels, 1.0, device), channel_vec(shift, channels, 0.0, device)


def grad_multiplier(scale, bn, channels: int, device) -> torch.Tensor:
    """The per-channel factor the backward scan multiplies dL/dI by (binwslt.batchnorm.grad_multiplier)."""
    return channel_vec(batchnorm.grad_multiplier(scale, bn), channels, 1.0, device)


def epilogue_backward(part: torch.Tensor, alpha: torch.Tensor, scale, bn, count: int):
    """Reduce the backward scan's partial sums and apply binwslt.batchnorm.backward_coefficients.

    part: ``[2, programs, C]`` per-program sums of dL/dI and dL/dI·y; count: values per channel (T_y·rows).
    Returns :class:`binwslt.batchnorm.BackwardCoefficients` (``c1, c2, c3`` contiguous when BatchNorm is on).
    """
    sums = part.sum(dim=1)
    coeffs = batchnorm.backward_coefficients(alpha, f32(scale), bn, sums[0], sums[1], count)
    if coeffs.c1 is None:
        return coeffs
    return batchnorm.BackwardCoefficients(coeffs.grad_scale, coeffs.grad_shift, coeffs.c1.contiguous(),
                                          coeffs.c2.contiguous(), coeffs.c3.contiguous())


def subnet_operands(weight, scores, prune_rate, subnet: Optional[Subnet]):
    """``(tern, alpha)`` the kernels read: int8 ``[*weight.shape]`` contiguous and a 1-element fp32 alpha, taken from
    ``subnet`` (a cached `binwslt.subnet.Subnet`, weight's layout) or selected now (kernels/subnet.py)."""
    if subnet is None:
        from .subnet import ternary_subnet

        tern, alpha = ternary_subnet(weight, scores, prune_rate)
    else:
        tern, alpha = subnet.ternary.reshape(weight.shape), subnet.alpha
    return tern.contiguous(), alpha.reshape(1).to(torch.float32)


def kernel_input(x: torch.Tensor, is_spike: bool):
    """``(x, dtype)``: x (detached) as the forward kernels read it and the dtype the launcher's layout pass must give
    it. Spikes keep their dtype, so a fused layer's output (fp32/fp16/bf16, marked) reaches the next fused layer's
    kernel with no cast pass: the kernel converts each loaded tile to int8 in registers (``conv_tile``,
    ``linear_tile``); bool/uint8 spikes are viewed as int8 (the same 0/1 bytes: the kernels read a uint8 x as saved
    bits, kernels/spike_bits.py). Analog input: fp16 stays fp16, every other dtype becomes fp32."""
    x = x.detach()
    if is_spike:
        if x.dtype in (torch.bool, torch.uint8):
            x = x.view(torch.int8)
        return x, x.dtype
    return x, torch.float16 if x.dtype == torch.float16 else torch.float32


def prepare_input(x: torch.Tensor, direct: bool, layout):
    """The kernel input and its flags ``(x_k, is_spike, dot_fp16)``: ``x_k = layout(x, dtype)`` with x and dtype
    from `kernel_input` (``layout`` puts it in the launcher's memory layout; it is a view, no pass, when x has it
    already: a fused layer's spikes reach the next fused layer's kernel as they are). Spike-ness from the dtype or a
    fused layer's mark (binwslt.spikes.is_spikes), never from the values; a direct-encoded input is analog."""
    is_spike = (not direct) and is_spikes(x)
    x_k = layout(*kernel_input(x, is_spike))
    return x_k, is_spike, not is_spike and x_k.dtype == torch.float16


def io_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype the kernels read/write a caller tensor (residual, gradient) in: its own for fp32/fp16/bf16, fp32 for a
    float64 one (only a residual or a gradient reaches here as float64: the output and x are never float64) and for
    bool/uint8/int8 spikes."""
    return dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32


def check_float64(x: torch.Tensor, op: str) -> None:
    """The float64 policy (binwslt.backends.resolve_backend) sends float64 x to the torch backend: here it is an
    error, never a silent computation in fp32."""
    if x.dtype == torch.float64:
        raise TypeError(f"x is float64: the Triton {op} kernels compute in fp32; binwslt.functional routes float64 "
                        "to backend='torch' (binwslt.backends.resolve_backend), call it there")


__all__ = ["INT32_LIMIT", "check_int32", "device_sms", "device_arch", "channel_vec", "y_dtype", "bn_forward", "plain_affine",
           "grad_multiplier", "epilogue_backward", "subnet_operands", "derived", "kernel_input",
           "prepare_input", "io_dtype", "check_float64"]
