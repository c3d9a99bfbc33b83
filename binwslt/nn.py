"""Modules over `binwslt.functional`: drop-in binary-subnet layers and fused layer + LIF blocks.

Modules are stateless across calls (no ``reset_net``): every forward runs all T steps. They keep the frozen
random weights in ``.weight`` (``requires_grad=False``; set it True to fine-tune through the sign with a
straight-through estimator) and the trainable pruning scores in ``.scores``, of the same shape.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import functional
from .batchnorm import eval_affine
from .backends import resolve_backend
from .config import LIFConfig
from .subnet import SubnetCache, check_prune_rate, subnet_mask, subnet_weight

__all__ = ["LIF", "BinWConv2d", "BinWLinear", "BinWConv2dLIF", "BinWLinearLIF", "convert", "ConversionError",
           "score_parameters", "finetune_parameters", "find_parameters", "fused_layers"]


class LIF(nn.Module):
    """LIF neuron over ``[T, N, ...]`` currents -> spikes of the same shape (multi-step, time-major)."""

    def __init__(self, neuron: LIFConfig = LIFConfig(), backend: str = "auto"):
        super().__init__()
        resolve_backend(backend, torch.device("cpu"))
        self.neuron, self.backend = neuron, backend

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        return functional.lif(x_seq, self.neuron, self.backend)

    def extra_repr(self) -> str:
        return f"{self.neuron}, backend={self.backend!r}"


class _SubnetParams(nn.Module):
    """Frozen Kaiming-normal weights (fan_in, ReLU gain) and Kaiming-uniform scores (a=√5), design.md §3."""

    def _init_subnet(self, shape, prune_rate: float):
        self.prune_rate = check_prune_rate(prune_rate)
        self._subnet_cache = SubnetCache()  # (ternary, α) kept while weight, scores and prune_rate are unchanged
        self.weight = nn.Parameter(torch.empty(shape), requires_grad=False)
        self.scores = nn.Parameter(torch.empty(shape))
        nn.init.kaiming_normal_(self.weight, mode="fan_in", nonlinearity="relu")
        nn.init.kaiming_uniform_(self.scores, a=math.sqrt(5))

    def effective_weight(self) -> torch.Tensor:
        """α·M⊙sign(w), the weight the layer computes with (differentiable to ``scores``)."""
        return subnet_weight(self.weight, self.scores, self.prune_rate,
                             subnet=self._subnet_cache.get(self.weight, self.scores, self.prune_rate, "torch"))

    def _subnet(self, x: torch.Tensor, backend: str):
        """The cached `Subnet` for the backend that runs on ``x``'s device (None where it has no make_subnet)."""
        return self._subnet_cache.get(self.weight, self.scores, self.prune_rate,
                                     resolve_backend(backend, x.device, x.dtype))

    def mask(self) -> torch.Tensor:
        """Bool mask of the kept weights, shape of ``weight``."""
        return subnet_mask(self.scores, self.prune_rate)


def _merge_time(x: torch.Tensor, rank: int):
    """Fold a leading time dim into the batch for a layer that works on rank-``rank`` frames."""
    if x.dim() == rank + 1:
        return x.flatten(0, 1), x.shape[:2]
    if x.dim() == rank:
        return x, None
    raise ValueError(f"x must have rank {rank} or {rank + 1} (time-major), got shape {tuple(x.shape)}")


class BinWConv2d(_SubnetParams):
    """Binary-subnet `nn.Conv2d` (no neuron): conv(x, α·M⊙sign(w)) on ``[N, C, H, W]`` or ``[T, N, C, H, W]``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 prune_rate: float = 0.4, bias: bool = False):
        super().__init__()
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (kh, kw)
        self.stride, self.padding = stride, padding
        self._init_subnet((out_channels, in_channels, kh, kw), prune_rate)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames, lead = _merge_time(x, 4)
        out = F.conv2d(frames, self.effective_weight().to(frames.dtype), self.bias, self.stride, self.padding)
        return out if lead is None else out.view(tuple(lead) + tuple(out.shape[1:]))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, prune_rate={self.prune_rate}, bias={self.bias is not None}")


class BinWLinear(_SubnetParams):
    """Binary-subnet `nn.Linear` (no neuron) on ``[N, in]`` or ``[T, N, in]``."""

    def __init__(self, in_features: int, out_features: int, prune_rate: float = 0.4, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_subnet((out_features, in_features), prune_rate)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, prune_rate={self.prune_rate}, "
                f"bias={self.bias is not None}")


class _FusedLIFLayer(_SubnetParams):
    """Shared BN handling of the fused layers: batch statistics in training, folded into scale/shift in eval."""

    def _init_fused(self, channels, batch_norm, bn_class, neuron, timesteps, backend, grad_precision, memory="auto"):
        if not isinstance(neuron, LIFConfig):
            raise TypeError(f"neuron must be a binwslt.LIFConfig, got {type(neuron).__name__}")
        resolve_backend(backend, torch.device("cpu"))
        if grad_precision not in functional.GRAD_PRECISIONS:
            raise ValueError(f"grad_precision must be one of {list(functional.GRAD_PRECISIONS)}, "
                             f"got {grad_precision!r}")
        self.neuron, self.timesteps, self.backend = neuron, timesteps, backend
        if memory not in functional.MEMORY_MODES:
            raise ValueError(f"memory must be one of {list(functional.MEMORY_MODES)}, got {memory!r}")
        self.grad_precision, self.memory = grad_precision, memory
        self.bn = bn_class(channels) if batch_norm else None

    def _bn_kwargs(self) -> dict:
        bn = self.bn
        if bn is None:
            return {}
        if self.training or not bn.track_running_stats:
            if self.training and bn.track_running_stats:
                bn.num_batches_tracked.add_(1)
            momentum = bn.momentum
            if momentum is None:  # cumulative moving average, as nn.BatchNorm does
                momentum = 1.0 / float(bn.num_batches_tracked) if self.training and bn.track_running_stats else 0.0
            return dict(scale=bn.weight, shift=bn.bias, batch_norm=True, running_mean=bn.running_mean,
                        running_var=bn.running_var, momentum=momentum, eps=bn.eps)
        scale, shift = eval_affine(bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
        return dict(scale=scale, shift=shift)


class BinWConv2dLIF(_FusedLIFLayer):
    """Binary-subnet conv + (BatchNorm) + LIF in one fused op: ``[T, N, C_in, H, W]`` spikes (or the analog
    ``[N, C_in, H, W]`` image when ``timesteps`` is set) -> spikes ``[T, N, C_out, H', W']``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 prune_rate: float = 0.4, batch_norm: bool = True, neuron: LIFConfig = LIFConfig(),
                 timesteps: Optional[int] = None, backend: str = "auto", grad_precision: str = "split",
                 memory: str = "auto"):
        super().__init__()
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (kh, kw)
        self.stride, self.padding = stride, padding
        self._init_subnet((out_channels, in_channels, kh, kw), prune_rate)
        self._init_fused(out_channels, batch_norm, nn.BatchNorm2d, neuron, timesteps, backend, grad_precision,
                         memory)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        timesteps = self.timesteps if x.dim() == 4 else None
        return functional.binw_conv2d_lif(
            x, self.weight, self.scores, self.prune_rate, stride=self.stride, padding=self.padding,
            residual=residual, neuron=self.neuron, timesteps=timesteps, backend=self.backend,
            subnet=self._subnet(x, self.backend), grad_precision=self.grad_precision, memory=self.memory,
            **self._bn_kwargs())

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, prune_rate={self.prune_rate}, timesteps={self.timesteps}, "
                f"backend={self.backend!r}")


class BinWLinearLIF(_FusedLIFLayer):
    """Binary-subnet linear + (BatchNorm) + LIF: ``[T, N, in]`` (or ``[N, in]`` with ``timesteps``) -> ``[T, N, out]``."""

    def __init__(self, in_features: int, out_features: int, prune_rate: float = 0.4, batch_norm: bool = True,
                 neuron: LIFConfig = LIFConfig(), timesteps: Optional[int] = None, backend: str = "auto",
                 grad_precision: str = "split", memory: str = "auto"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_subnet((out_features, in_features), prune_rate)
        self._init_fused(out_features, batch_norm, nn.BatchNorm1d, neuron, timesteps, backend, grad_precision,
                         memory)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        timesteps = self.timesteps if x.dim() == 2 else None
        return functional.binw_linear_lif(
            x, self.weight, self.scores, self.prune_rate, residual=residual, neuron=self.neuron,
            timesteps=timesteps, backend=self.backend, subnet=self._subnet(x, self.backend),
            grad_precision=self.grad_precision, memory=self.memory, **self._bn_kwargs())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, prune_rate={self.prune_rate}, "
                f"timesteps={self.timesteps}, backend={self.backend!r}")


# convert and the parameter selections live in binwslt/convert.py; binwslt.nn.convert is their public name.
from .convert import (ConversionError, convert, find_parameters, finetune_parameters, fused_layers,  # noqa: E402
                      score_parameters)
