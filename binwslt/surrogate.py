"""Surrogate derivatives of the Heaviside spike function (design.md §2)."""
from __future__ import annotations

import math

import torch

SURROGATE_CODES = {"atan": 0, "sigmoid": 1, "triangle": 2}
"""The one table of surrogate codes: the integer the Triton kernels' SURROGATE constexpr (kernels/lif.py) and the
CPU scans (binwslt/csrc/lif_scan.cpp) branch on. Its names are binwslt.config.SURROGATE_DEFAULT_ALPHA's."""


def surrogate_grad(x: torch.Tensor, surrogate: str, alpha: float) -> torch.Tensor:
    """dS/dU evaluated at ``x = U - V_th``; same shape and dtype as ``x``.

    atan: (α/2) / (1 + (π/2·α·x)²); sigmoid: α·s(αx)·(1 - s(αx)); triangle: max(0, α - α²|x|).
    """
    return surrogate_grad_(x.clone(), surrogate, alpha)


def surrogate_grad_(x: torch.Tensor, surrogate: str, alpha: float) -> torch.Tensor:
    """In-place `surrogate_grad`: overwrites and returns ``x`` (one buffer, no temporaries)."""
    if surrogate == "atan":
        return x.mul_(math.pi / 2.0 * alpha).square_().add_(1.0).reciprocal_().mul_(alpha / 2.0)
    if surrogate == "sigmoid":
        x.mul_(alpha).sigmoid_()
        return x.addcmul_(x, x, value=-1.0).mul_(alpha)  # s - s² = s(1 - s)
    if surrogate == "triangle":
        return x.abs_().mul_(-alpha * alpha).add_(alpha).clamp_(min=0.0)
    raise ValueError(f"surrogate must be one of {sorted(SURROGATE_CODES)}, got {surrogate!r}")


class SurrogateSpike(torch.autograd.Function):
    """Heaviside forward (H(0) = 1), surrogate derivative backward. Input ``x = U - V_th``, any shape."""

    @staticmethod
    def forward(ctx, x, surrogate, alpha):
        ctx.save_for_backward(x)
        ctx.surrogate, ctx.alpha = surrogate, alpha
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * surrogate_grad(x, ctx.surrogate, ctx.alpha), None, None
