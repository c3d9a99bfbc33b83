"""The functional API: validate arguments, then dispatch to a backend.

Spikes are time-major (``[T, N, C, H, W]`` or ``[T, N, F]``), values 0 or 1, as float, bool or uint8. A first
layer may take its analog input ``[N, C, H, W]`` / ``[N, F]`` with ``timesteps=T`` (direct encoding: the
convolution is computed once and drives the neuron at every step). Outputs are spikes in x's floating dtype
(float32 for bool/uint8 x). Gradients flow to x, scores, scale, shift and residual.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Union

import torch

from .backends import backend_module, resolve_backend
from .config import LIFConfig
from .spikes import mark_spikes, spike_output_dtype
from .subnet import Subnet, check_prune_rate, subnet_weight  # noqa: F401  (subnet_weight is part of this API)

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

__all__ = ["lif", "subnet_weight", "binw_conv2d_lif", "binw_linear_lif", "GRAD_PRECISIONS", "MEMORY_MODES"]

GRAD_PRECISIONS = ("split", "bf16")
"""``grad_precision`` values: "split" (default; the fp32 gradient operand as bf16/fp16 high + low terms,
fp32-level accuracy) or "bf16" (one low-precision term, an explicit opt-in). The reference backend ignores it."""

MEMORY_MODES = ("auto", "save", "recompute")
"""``memory`` values: what a fused layer keeps for backward. "save": its exact pre-activation ``y``; "recompute":
only the input (spikes as bits) and per-channel vectors, ``y`` recomputed in the backward with the same GEMM;
"auto" (default): the backend's choice per layer shape. A backend module lists the modes it implements in its
``MEMORY_MODES`` attribute (e.g. kernels/conv_lif.py); "auto" and "save" run on every backend (the others keep
what they keep), "recompute" on one without that path is a ValueError."""


def _as_float(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype in (torch.bool, torch.uint8, torch.int8):
        return mark_spikes(x.to(torch.float32))  # still spikes: the backends see it by the mark
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float, bool or uint8, got dtype {x.dtype}")
    return x


def _check_not_empty(x: torch.Tensor, T: Optional[int], name: str = "x"):
    """T = 0 or an empty batch (N = 0) or feature dimension: one ValueError on every backend, before any work
    (an empty batch would otherwise put NaN into BatchNorm's running statistics)."""
    if T is None and x.shape[0] == 0:
        raise ValueError(f"{name} has no timesteps (T = 0, shape {tuple(x.shape)}): T must be >= 1")
    if x.numel() == 0:
        what = "an empty batch (N = 0)" if x.shape[0 if T is not None else 1] == 0 else "a zero-size dimension"
        raise ValueError(f"{name} has {what}, shape {tuple(x.shape)}: pass at least one sample (an empty batch is "
                         "skipped by the caller, never run)")


def _check_weight_dtype(t: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 weight or scores: upcast to float32 (exact, so the mask and α are unchanged) on every backend;
    gradients flow back in the tensor's own dtype."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _backend(backend: str, x: torch.Tensor):
    """The backend module for ``backend`` and x's device; ValueError for ``"triton"`` on non-CUDA tensors."""
    name = resolve_backend(backend, x.device, x.dtype)
    if name == "triton" and x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend='triton' needs CUDA tensors, x is on {x.device}: use backend='torch' (or "
                         "'auto') on a CPU, or move the model and input to a GPU")
    return backend_module(name)


def _spike_output(out: torch.Tensor, x_dtype: torch.dtype) -> torch.Tensor:
    """A fused layer's spikes in the one output dtype (`binwslt.spikes.spike_output_dtype`); the cast of 0/1 is
    exact and the result stays marked as spikes."""
    dtype = spike_output_dtype(x_dtype)
    return out if out.dtype == dtype else mark_spikes(out.to(dtype))


def _check_neuron(neuron) -> LIFConfig:
    if not isinstance(neuron, LIFConfig):
        raise TypeError(f"neuron must be a binwslt.LIFConfig, got {type(neuron).__name__}")
    return neuron


def _pair(value, name: str):
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else tuple(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair


def _check_same_device(device, **tensors):
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but x is on {device}")


def _check_channel_vector(v, name: str, channels: int):
    if v is None:
        return None
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of shape [{channels}] or None, got {type(v).__name__}")
    if v.shape != (channels,):
        raise ValueError(f"{name} must have shape [{channels}] (one per output channel), got {tuple(v.shape)}")
    if not v.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {v.dtype}")
    return v


def _check_timesteps(timesteps, x_rank: int, seq_rank: int, name: str = "x"):
    """Decide direct encoding: x of rank seq_rank-1 needs timesteps, rank seq_rank must not have it."""
    if x_rank == seq_rank - 1:
        if timesteps is None:
            raise ValueError(f"{name} of rank {x_rank} is an analog input: pass timesteps=T (direct encoding)")
        if isinstance(timesteps, bool) or not isinstance(timesteps, int) or timesteps < 1:
            raise ValueError(f"timesteps must be an int >= 1, got {timesteps!r}")
        return timesteps
    if x_rank == seq_rank:
        if timesteps is not None:
            raise ValueError(f"timesteps={timesteps!r} is only for an analog rank-{seq_rank - 1} input; "
                             f"x is already time-major with rank {seq_rank}")
        return None
    raise ValueError(f"{name} must have rank {seq_rank} (time-major) or {seq_rank - 1} (analog, with timesteps), "
                     f"got rank {x_rank}")


def _check_weights(weight, scores, prune_rate, rank: int, device):
    for name, t in (("weight", weight), ("scores", scores)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if weight.dim() != rank:
        raise ValueError(f"weight must have rank {rank}, got shape {tuple(weight.shape)}")
    if scores.shape != weight.shape:
        raise ValueError(f"scores shape {tuple(scores.shape)} must equal weight shape {tuple(weight.shape)}")
    _check_same_device(device, weight=weight, scores=scores)
    return check_prune_rate(prune_rate)


def _check_batch_norm(batch_norm, running_mean, running_var, momentum, eps, channels, device):
    if not isinstance(batch_norm, bool):
        raise TypeError(f"batch_norm must be a bool, got {batch_norm!r}")
    for name, v in (("running_mean", running_mean), ("running_var", running_var)):
        _check_channel_vector(v, name, channels)
    _check_same_device(device, running_mean=running_mean, running_var=running_var)
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
    if not float(eps) > 0.0:
        raise ValueError(f"eps must be > 0, got {eps!r}")


def _check_epilogue(device, out_shape, scale, shift, residual, batch_norm, running_mean, running_var, momentum,
                    eps):
    """The per-output-channel epilogue's arguments of a fused layer whose output is ``out_shape``
    (channels at dim 2)."""
    channels = out_shape[2]
    _check_channel_vector(scale, "scale", channels)
    _check_channel_vector(shift, "shift", channels)
    _check_same_device(device, scale=scale, shift=shift, residual=residual)
    if residual is not None and tuple(residual.shape) != tuple(out_shape):
        raise ValueError(f"residual must have the output shape {tuple(out_shape)}, got {tuple(residual.shape)}")
    _check_batch_norm(batch_norm, running_mean, running_var, momentum, eps, channels, device)


def _backend_options(subnet, grad_precision, device, weight_shape) -> dict:
    """Check ``subnet`` / ``grad_precision`` and return the keywords to pass on to the backend.

    Only non-default values are passed, so a backend that predates a keyword keeps working with its default.
    """
    if grad_precision not in GRAD_PRECISIONS:
        raise ValueError(f"grad_precision must be one of {list(GRAD_PRECISIONS)}, got {grad_precision!r}")
    options = {}
    if subnet is not None:
        if not isinstance(subnet, Subnet):
            raise TypeError(f"subnet must be a binwslt.subnet.Subnet or None, got {type(subnet).__name__}")
        if subnet.ternary.device != device or subnet.alpha.device != device:
            raise ValueError(f"subnet is on {subnet.ternary.device} but x is on {device}")
        if subnet.ternary.numel() != math.prod(weight_shape):
            raise ValueError(f"subnet.ternary has {subnet.ternary.numel()} weights, weight has "
                             f"{math.prod(weight_shape)} (shape {tuple(weight_shape)})")
        options["subnet"] = subnet
    if grad_precision != "split":
        options["grad_precision"] = grad_precision
    return options


def _memory_option(memory, impl, op) -> dict:
    """Check ``memory`` for backend module ``impl``'s op and return the keyword to pass on (none for "auto")."""
    if memory not in MEMORY_MODES:
        raise ValueError(f"memory must be one of {list(MEMORY_MODES)}, got {memory!r}")
    supported = getattr(impl, "MEMORY_MODES", {}).get(op, ())
    if memory == "recompute" and memory not in supported:
        raise ValueError(f"memory='recompute' is not implemented by backend {impl.__name__} for {op}; "
                         f"use memory='save' or 'auto'")
    return {"memory": memory} if memory != "auto" and memory in supported else {}


def _run_fused(op, x, weight, scores, prune_rate, backend, subnet, grad_precision, memory, *, neuron, momentum,
               eps, **kwargs) -> torch.Tensor:
    """The one host pipeline after a fused layer's own shape checks: neuron, backend options, backend choice,
    memory mode, then backend op ``op`` (``"binw_conv2d_lif"`` or ``"binw_linear_lif"``) and the output dtype."""
    neuron = _check_neuron(neuron)
    options = _backend_options(subnet, grad_precision, x.device, weight.shape)
    impl = _backend(backend, x)
    options.update(_memory_option(memory, impl, op))
    out = getattr(impl, op)(x, weight, scores, prune_rate, neuron=neuron, momentum=float(momentum), eps=float(eps),
                            **kwargs, **options)
    return _spike_output(out, x.dtype)


def lif(x_seq: torch.Tensor, neuron: LIFConfig = LIFConfig(), backend: str = "auto") -> torch.Tensor:
    """LIF neuron over all timesteps.

    Args:
        x_seq: input currents ``[T, ...]`` (at least 2-D), floating point.
        neuron: the neuron's `LIFConfig`.
        backend: ``"reference"``, ``"torch"``, ``"triton"`` or ``"auto"``.
    Returns:
        spikes, same shape and dtype as ``x_seq``, values 0 or 1.
    """
    x_seq = _as_float(x_seq, "x_seq")
    if x_seq.dim() < 2:
        raise ValueError(f"x_seq must be time-major [T, N, ...] with rank >= 2, got shape {tuple(x_seq.shape)}")
    _check_not_empty(x_seq, None, "x_seq")
    neuron = _check_neuron(neuron)
    return _backend(backend, x_seq).lif(x_seq, neuron)


def binw_conv2d_lif(x: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor, prune_rate: float, *,
                    stride: Union[int, Sequence[int]] = 1, padding: Union[int, Sequence[int]] = 0,
                    scale: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None,
                    residual: Optional[torch.Tensor] = None, neuron: LIFConfig = LIFConfig(),
                    timesteps: Optional[int] = None, backend: str = "auto", batch_norm: bool = False,
                    running_mean: Optional[torch.Tensor] = None, running_var: Optional[torch.Tensor] = None,
                    momentum: float = 0.1, eps: float = 1e-5, subnet: Optional[Subnet] = None,
                    grad_precision: str = "split", memory: str = "auto") -> torch.Tensor:
    """Binary-subnet convolution fused with the LIF neuron over all T steps.

    ``I[t] = scale ⊙ conv(X[t], α·M⊙sign(w)) + shift (+ residual[t])``, ``S = LIF(I)``.

    Args:
        x: spikes ``[T, N, C_in, H, W]`` (float/bool/uint8), or an analog image ``[N, C_in, H, W]`` with ``timesteps``.
        weight: frozen random weights ``[C_out, C_in, kh, kw]``, float.
        scores: pruning scores, same shape as ``weight``.
        prune_rate: fraction of weights removed, in [0, 1).
        stride, padding: as `torch.nn.functional.conv2d` (int or pair).
        scale, shift: optional per-output-channel ``[C_out]`` float (folded BatchNorm, bias).
        residual: optional ``[T, N, C_out, H', W']`` added to the current.
        neuron: the `LIFConfig`.
        timesteps: T, only for the analog (direct-encoded) input.
        backend: ``"reference"``, ``"torch"``, ``"triton"`` or ``"auto"``.
        batch_norm: training-mode BatchNorm over (T, N, H', W') per channel before ``scale``/``shift`` (gamma/beta);
            ``running_mean``/``running_var`` ``[C_out]`` are updated in place with ``momentum`` when given.
        subnet: the layer's precomputed `binwslt.subnet.Subnet` from the backend's ``make_subnet`` (the nn
            modules cache it while the scores are unchanged); None computes it here. The reference ignores it.
        grad_precision: ``"split"`` (default, fp32-level gradients from high + low low-precision terms) or
            ``"bf16"`` (one term, faster, ~3 significant digits in the gradients). The reference ignores it.
        memory: what is kept for backward, one of `MEMORY_MODES` (``"auto"``, ``"save"``, ``"recompute"``).
    Returns:
        spikes ``[T, N, C_out, H', W']`` in x's floating dtype (float32 for bool/uint8 x).
    """
    x = _as_float(x, "x")
    T = _check_timesteps(timesteps, x.dim(), 5)
    _check_not_empty(x, T)
    prune_rate = _check_weights(weight, scores, prune_rate, 4, x.device)
    weight, scores = _check_weight_dtype(weight), _check_weight_dtype(scores)
    stride, padding = _pair(stride, "stride"), _pair(padding, "padding")
    if min(stride) < 1 or min(padding) < 0:
        raise ValueError(f"stride must be >= 1 and padding >= 0, got stride={stride}, padding={padding}")
    C_out, C_in, kh, kw = weight.shape
    in_shape = x.shape if T is not None else x.shape[1:]
    if in_shape[1] != C_in:
        raise ValueError(f"x has {in_shape[1]} input channels but weight expects C_in={C_in} "
                         f"(x shape {tuple(x.shape)}, weight shape {tuple(weight.shape)})")
    H_out = (in_shape[2] + 2 * padding[0] - kh) // stride[0] + 1
    W_out = (in_shape[3] + 2 * padding[1] - kw) // stride[1] + 1
    if H_out < 1 or W_out < 1:
        raise ValueError(f"x spatial size {tuple(in_shape[2:])} is smaller than the kernel {(kh, kw)} with "
                         f"padding {padding}")
    steps = T if T is not None else x.shape[0]
    _check_epilogue(x.device, (steps, in_shape[0], C_out, H_out, W_out), scale, shift, residual, batch_norm,
                    running_mean, running_var, momentum, eps)
    return _run_fused("binw_conv2d_lif", x, weight, scores, prune_rate, backend, subnet, grad_precision, memory,
                      stride=stride, padding=padding, scale=scale, shift=shift, residual=residual, neuron=neuron,
                      timesteps=T, batch_norm=batch_norm, running_mean=running_mean, running_var=running_var,
                      momentum=momentum, eps=eps)


def binw_linear_lif(x: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor, prune_rate: float, *,
                    scale: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None,
                    residual: Optional[torch.Tensor] = None, neuron: LIFConfig = LIFConfig(),
                    timesteps: Optional[int] = None, backend: str = "auto", batch_norm: bool = False,
                    running_mean: Optional[torch.Tensor] = None, running_var: Optional[torch.Tensor] = None,
                    momentum: float = 0.1, eps: float = 1e-5, subnet: Optional[Subnet] = None,
                    grad_precision: str = "split", memory: str = "auto") -> torch.Tensor:
    """Binary-subnet linear layer fused with the LIF neuron over all T steps.

    Args:
        x: ``[T, N, in]`` spikes or analog features (float/bool/uint8), or an analog ``[N, in]`` with ``timesteps``.
        weight: frozen random weights ``[out, in]``, float; scores: same shape; prune_rate in [0, 1).
        scale, shift: optional ``[out]`` float; residual: optional ``[T, N, out]``.
        neuron, timesteps, backend, batch_norm, running_mean, running_var, momentum, eps, subnet,
        grad_precision, memory: as `binw_conv2d_lif`.
    Returns:
        spikes ``[T, N, out]`` in x's floating dtype (float32 for bool/uint8 x).
    """
    x = _as_float(x, "x")
    T = _check_timesteps(timesteps, x.dim(), 3)
    _check_not_empty(x, T)
    prune_rate = _check_weights(weight, scores, prune_rate, 2, x.device)
    weight, scores = _check_weight_dtype(weight), _check_weight_dtype(scores)
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features but weight expects in={in_features} "
                         f"(x shape {tuple(x.shape)}, weight shape {tuple(weight.shape)})")
    steps = T if T is not None else x.shape[0]
    _check_epilogue(x.device, (steps, x.shape[-2], out_features), scale, shift, residual, batch_norm,
                    running_mean, running_var, momentum, eps)
    return _run_fused("binw_linear_lif", x, weight, scores, prune_rate, backend, subnet, grad_precision, memory,
                      scale=scale, shift=shift, residual=residual, neuron=neuron, timesteps=T, batch_norm=batch_norm,
                      running_mean=running_mean, running_var=running_var, momentum=momentum, eps=eps)
