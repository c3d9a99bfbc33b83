"""BatchNorm of a binary-weight layer's pre-activation, defined once for every backend (docs/design.md §4).

A fused layer computes the exact pre-activation ``y = conv/linear(x, tern)`` (integers for spike input) and its
current ``I = gain·(α·y) + bias`` per channel, where training-mode BatchNorm normalises ``α·y`` with the batch
statistics over every axis but the channel one (T, N and the pixels), then applies ``scale`` (γ) and ``shift`` (β).
This module holds the formulas; the backends (binwslt.torch_backend, the Triton launchers in kernels/) only reduce
their tensors and call them:

- :func:`stats_from_sums` / :func:`stats_from_values`: per-channel mean and biased variance of ``α·y``;
- :func:`train_rstd`: update the running statistics in place and return ``rstd = 1/sqrt(var + eps)``;
- :func:`current_affine`: the per-channel ``(gain, bias)`` of the current (with or without BatchNorm);
- :func:`eval_affine`: BatchNorm in eval mode folded into a plain ``(scale, shift)``;
- :func:`backward_coefficients`: gradients to γ, β and the per-channel ``c1, c2, c3`` with
  ``dL/d(α·y) = c1·g + c2·y + c3`` through the batch statistics (g = dL/dI).

Vectors are ``[C]``; tensors keep the dtype they come in (fp32 on the Triton path, the caller's on the torch path).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class BatchStats:
    """Training-mode batch statistics of ``α·y`` per channel: ``mean`` and ``rstd = 1/sqrt(var + eps)``, ``[C]``."""

    mean: Tensor
    rstd: Tensor


@dataclass(frozen=True)
class BackwardCoefficients:
    """Per-channel results of the epilogue's backward, ``[C]`` each.

    ``grad_scale`` / ``grad_shift``: dL/dγ and dL/dβ (with BatchNorm) or dL/dscale and dL/dshift (without).
    ``c1, c2, c3``: with BatchNorm, dL/d(α·y) = c1·g + c2·y + c3 (g = dL/dI); None without BatchNorm, where
    dL/d(α·y) = scale·g (:func:`grad_multiplier`).
    """

    grad_scale: Tensor
    grad_shift: Tensor
    c1: Optional[Tensor] = None
    c2: Optional[Tensor] = None
    c3: Optional[Tensor] = None


def stats_from_sums(sum_y: Tensor, sum_yy: Tensor, frames: int, alpha: Tensor):
    """Mean and biased variance of ``α·y`` from per-channel sums of ``y`` and ``y²`` over ``frames`` values.

    sum_y, sum_yy: ``[C]`` (int64 for spike input: exact; or float); alpha: 0-dim or ``[1]`` float. Reduced in
    float64 (integer sums stay exact up to 2**53) and returned as float32 ``[C]`` each.
    """
    mean_y = sum_y.to(torch.float64) / frames
    var_y = (sum_yy.to(torch.float64) / frames - mean_y * mean_y).clamp_min(0.0)
    alpha64 = alpha.to(torch.float64)
    return (alpha64 * mean_y).to(torch.float32), (alpha64 * alpha64 * var_y).to(torch.float32)


def stats_from_values(y: Tensor, alpha: Tensor, channel_dim: int):
    """Mean and biased variance of ``α·y`` per channel, reducing every dim of ``y`` but ``channel_dim``.

    y: float tensor; alpha: 0-dim tensor of y's dtype. Returns ``(mean, var)``, ``[C]`` in y's dtype.
    """
    var_y, mean_y = torch.var_mean(y, dim=[d for d in range(y.dim()) if d != channel_dim], correction=0)
    return mean_y * alpha, var_y * (alpha * alpha)


def update_running_stats(running_mean, running_var, mean: Tensor, var: Tensor, count: int, momentum: float) -> None:
    """In-place exponential update of BatchNorm running statistics (unbiased variance, as F.batch_norm does).

    running_mean, running_var: ``[C]`` tensors or None; mean, var: the batch's ``[C]``; count: values per channel.
    """
    with torch.no_grad():
        if running_mean is not None:
            running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        if running_var is not None:
            unbiased = var * (count / max(count - 1, 1))
            running_var.mul_(1.0 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)


def train_rstd(mean: Tensor, var: Tensor, count: int, running_mean, running_var, momentum: float, eps: float):
    """Training step of BatchNorm: update the running statistics and return the :class:`BatchStats` to normalise
    with. ``count``: values per channel the batch statistics cover (T·N·OH·OW; a direct-encoded input counts its
    T copies)."""
    update_running_stats(running_mean, running_var, mean, var, count, momentum)
    return BatchStats(mean=mean, rstd=torch.rsqrt(var + eps))


def current_affine(scale: Optional[Tensor], shift: Optional[Tensor], bn: Optional[BatchStats]):
    """Per-channel ``(gain, bias)`` of the current ``I = gain·(α·y) + bias``.

    Without BatchNorm ``gain = scale``, ``bias = shift``; with it ``gain = γ·rstd``, ``bias = β - mean·gain``
    (γ = scale, β = shift). None stands for gain 1 / bias 0. Inputs ``[C]`` or None; outputs ``[C]`` or None.
    """
    if bn is None:
        return scale, shift
    gain = bn.rstd if scale is None else bn.rstd * scale
    bias = -bn.mean * gain if shift is None else shift - bn.mean * gain
    return gain, bias


def eval_affine(running_mean: Tensor, running_var: Tensor, eps: float, weight: Optional[Tensor],
                bias: Optional[Tensor]):
    """BatchNorm in eval mode as a plain ``(scale, shift)``: ``scale = γ/sqrt(running_var + eps)``,
    ``shift = β - running_mean·scale`` (γ = weight, β = bias; None for an affine-free BatchNorm). ``[C]`` each,
    differentiable to γ and β."""
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -running_mean * scale
    if bias is not None:
        shift = shift + bias
    return scale, shift


def grad_multiplier(scale: Optional[Tensor], bn: Optional[BatchStats]) -> Optional[Tensor]:
    """The per-channel factor dL/d(α·y) = factor·dL/dI applied inside the backward scan: ``scale`` without
    BatchNorm, None (1) with it (there :func:`backward_coefficients` gives the full fold)."""
    return scale if bn is None else None


def backward_coefficients(alpha: Tensor, scale: Optional[Tensor], bn: Optional[BatchStats], sum_g: Tensor,
                          sum_gy: Tensor, count: int) -> BackwardCoefficients:
    """Gradients of the per-channel epilogue from two reductions of g = dL/dI over the ``count`` values per channel.

    sum_g = Σ g, sum_gy = Σ g·y (``[C]``); alpha 0-dim/``[1]``; scale ``[C]`` or None. Without BatchNorm:
    dL/dscale = α·Σ g·y, dL/dshift = Σ g. With it (x̂ = (α·y - mean)·rstd): dL/dγ = Σ g·x̂, dL/dβ = Σ g,
    dL/d(α·y) = rstd·γ·(g - mean(g) - x̂·mean(g·x̂)) = c1·g + c2·y + c3.
    """
    if bn is None:
        return BackwardCoefficients(grad_scale=alpha * sum_gy, grad_shift=sum_g)
    mean, rstd = bn.mean, bn.rstd
    sum_gxhat = rstd * (alpha * sum_gy - mean * sum_g)
    c1 = rstd if scale is None else rstd * scale
    k = c1 * sum_gxhat / count
    return BackwardCoefficients(grad_scale=sum_gxhat, grad_shift=sum_g, c1=c1, c2=-k * alpha * rstd,
                                c3=-c1 * sum_g / count + k * mean * rstd)


__all__ = ["BatchStats", "BackwardCoefficients", "stats_from_sums", "stats_from_values", "update_running_stats",
           "train_rstd", "current_affine", "eval_affine", "grad_multiplier", "backward_coefficients"]
