"""The binary-weight subnetwork of MPT-1/32 (design.md §3): mask, gain α, ternary weight, straight-through rule."""
from __future__ import annotations

import math

import numpy as np
import torch


def check_prune_rate(prune_rate) -> float:
    """Return ``prune_rate`` as float after checking it lies in [0, 1)."""
    if isinstance(prune_rate, bool) or not isinstance(prune_rate, (int, float)) or not math.isfinite(prune_rate) \
            or not 0.0 <= prune_rate < 1.0:
        raise ValueError(f"prune_rate must be a number in [0, 1), got {prune_rate!r}")
    return float(prune_rate)


def n_pruned(numel: int, prune_rate: float) -> int:
    """How many weights a layer of ``numel`` weights removes: floor(prune_rate * numel)."""
    return int(math.floor(check_prune_rate(prune_rate) * numel))


def subnet_mask(scores: torch.Tensor, prune_rate: float) -> torch.Tensor:
    """Bool mask, shape of ``scores``: False for the n_pruned smallest |scores| (ties: lower flat index pruned first).

    Selection, not a sort: the k-th smallest |s| is the threshold; values tied with it are pruned in index order.
    """
    k = n_pruned(scores.numel(), prune_rate)
    magnitude = scores.detach().abs().reshape(-1)
    if k == 0:
        return torch.ones_like(magnitude, dtype=torch.bool).view(scores.shape)
    if magnitude.device.type == "cpu":  # numpy's introselect is ~8x faster than torch.kthvalue on CPU
        threshold = torch.as_tensor(np.partition(magnitude.numpy(), k - 1)[k - 1])
    else:
        threshold = torch.kthvalue(magnitude, k).values
    keep = magnitude > threshold
    ties = torch.nonzero(magnitude == threshold).flatten()
    n_tied_pruned = k - int((magnitude < threshold).sum())
    keep[ties[n_tied_pruned:]] = True
    return keep.view(scores.shape)


def ternary_subnet(weight: torch.Tensor, scores: torch.Tensor, prune_rate: float):
    """Ternary weight and gain of the subnetwork.

    Returns ``(tern, alpha)``: ``tern`` int8 with the shape of ``weight``, values M·sign(w) in {-1, 0, 1};
    ``alpha`` a 0-dim float32 tensor, Σ|w|·M / ΣM. The effective weight is ``alpha * tern``.
    """
    mask = subnet_mask(scores, prune_rate)
    w = weight.detach()
    tern = (torch.sign(w) * mask).to(torch.int8)
    # summed in float64 so that any summation order (the Triton kernel's blocks) rounds to the same float32
    alpha = ((w.abs() * mask).sum(dtype=torch.float64) / mask.sum()).to(torch.float32)
    return tern, alpha


class _SubnetWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, scores, prune_rate):
        tern, alpha = ternary_subnet(weight, scores, prune_rate)
        ctx.save_for_backward(weight, scores, tern, alpha)
        return alpha.to(weight.dtype) * tern.to(weight.dtype)

    @staticmethod
    def backward(ctx, grad):
        weight, scores, tern, alpha = ctx.saved_tensors
        return straight_through_grads(grad, weight, scores, tern, alpha, ctx.needs_input_grad[:2]) + (None,)


def straight_through_grads(grad_weff, weight, scores, tern, alpha, needs=(True, True)):
    """Gradients of the effective weight α·M·sign(w) to ``(weight, scores)`` (None where not needed).

    Scores: MPT's straight-through rule dL/ds = dL/dW_eff ⊙ w ⊙ sign(s). Weight (fine-tuning only): straight
    through the sign, dL/dw = dL/dW_eff ⊙ α·M. No gradient flows through α.
    """
    grad_w = grad_weff * (alpha * (tern != 0)).to(grad_weff.dtype) if needs[0] else None
    grad_s = grad_weff * weight * torch.sign(scores) if needs[1] else None
    return grad_w, grad_s


def subnet_weight(weight: torch.Tensor, scores: torch.Tensor, prune_rate: float) -> torch.Tensor:
    """Effective weight α·M·sign(w), same shape and dtype as ``weight``; differentiable to ``scores`` (MPT rule).

    ``weight`` and ``scores`` must have the same shape; ``prune_rate`` in [0, 1) is the fraction removed.
    """
    if not isinstance(weight, torch.Tensor) or not isinstance(scores, torch.Tensor):
        raise TypeError(f"weight and scores must be tensors, got {type(weight).__name__} and {type(scores).__name__}")
    if weight.shape != scores.shape:
        raise ValueError(f"scores shape {tuple(scores.shape)} must equal weight shape {tuple(weight.shape)}")
    if weight.device != scores.device:
        raise ValueError(f"weight is on {weight.device} but scores is on {scores.device}")
    if not weight.is_floating_point() or not scores.is_floating_point():
        raise TypeError(f"weight and scores must be floating point, got {weight.dtype} and {scores.dtype}")
    check_prune_rate(prune_rate)
    return _SubnetWeight.apply(weight, scores, prune_rate)
