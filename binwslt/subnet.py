"""The binary-weight subnetwork of MPT-1/32 (design.md §3): mask, gain α, ternary weight, straight-through rule."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

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
        # numpy has no bfloat16: select on the exact float32 copy (same order, same values)
        values = magnitude.float() if magnitude.dtype == torch.bfloat16 else magnitude
        threshold = torch.as_tensor(np.partition(values.numpy(), k - 1)[k - 1]).to(magnitude.dtype)
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
    def forward(ctx, weight, scores, prune_rate, subnet):
        tern, alpha = ternary_subnet(weight, scores, prune_rate) if subnet is None else (subnet.ternary,
                                                                                            subnet.alpha)
        ctx.save_for_backward(weight, scores, tern, alpha)
        return alpha.to(weight.dtype) * tern.to(weight.dtype)

    @staticmethod
    def backward(ctx, grad):
        weight, scores, tern, alpha = ctx.saved_tensors
        return straight_through_grads(grad, weight, scores, tern, alpha, ctx.needs_input_grad[:2]) + (None, None)


def straight_through_grads(grad_weff, weight, scores, tern, alpha, needs=(True, True)):
    """Gradients of the effective weight α·M·sign(w) to ``(weight, scores)`` (None where not needed).

    Scores: MPT's straight-through rule dL/ds = dL/dW_eff ⊙ w ⊙ sign(s). Weight (fine-tuning only): straight
    through the sign, dL/dw = dL/dW_eff ⊙ α·M. No gradient flows through α.
    """
    grad_w = grad_weff * (alpha * (tern != 0)).to(grad_weff.dtype) if needs[0] else None
    grad_s = grad_weff * weight * torch.sign(scores) if needs[1] else None
    return grad_w, grad_s


def subnet_weight(weight: torch.Tensor, scores: torch.Tensor, prune_rate: float,
                  subnet: Optional["Subnet"] = None) -> torch.Tensor:
    """Effective weight α·M·sign(w), same shape and dtype as ``weight``; differentiable to ``scores`` (MPT rule).

    ``weight`` and ``scores`` must have the same shape; ``prune_rate`` in [0, 1) is the fraction removed.
    ``subnet``: a precomputed `Subnet` whose ``ternary`` has the shape of ``weight`` (the torch backend's
    layout), used instead of recomputing the mask.
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
    if subnet is not None and tuple(subnet.ternary.shape) != tuple(weight.shape):
        raise ValueError(f"subnet.ternary shape {tuple(subnet.ternary.shape)} must equal weight shape "
                         f"{tuple(weight.shape)}")
    return _SubnetWeight.apply(weight, scores, prune_rate, subnet)


@dataclass(frozen=True)
class Subnet:
    """A layer's subnetwork, computed once and reused while the scores are unchanged.

    ``ternary``: int8 M⊙sign(w) in {-1, 0, 1}, in the layout the producing backend's ``make_subnet`` documents
    (the torch backend: the shape of ``weight``). ``alpha``: 0-dim float32 tensor on the weight's device,
    Σ|w|·M / ΣM. A backend given a ``Subnet`` uses it instead of recomputing; gradients to the scores are the
    same either way (the straight-through rule needs only ``ternary`` and ``alpha``).
    """

    ternary: torch.Tensor
    alpha: torch.Tensor
    derived: dict = field(default_factory=dict, compare=False, repr=False)
    """Backend-private forms of the ternary weight derived from it on first use (`derived`: the torch backend keeps
    its prepacked int8 oneDNN and AMX weights here, the Triton one its K-major weight), so a cached subnet carries
    them from call to call."""


def derived(subnet: Optional[Subnet], key, make):
    """``make()``, kept in ``subnet.derived[key]`` (``key`` hashable) so a cached subnet carries it from call to
    call (recomputed when there is no subnet)."""
    if subnet is None:
        return make()
    if key not in subnet.derived:
        subnet.derived[key] = make()
    return subnet.derived[key]


class SubnetCache:
    """Caches one layer's `Subnet` (used by the nn modules): recomputed only when the weight's or the scores'
    ``_version`` or ``data_ptr``, the prune rate, the device or the backend change.

    ``get(weight, scores, prune_rate, backend)`` returns the cached or a freshly made `Subnet`, or None when the
    backend module has no ``make_subnet`` (the op then computes the subnet itself). ``backend`` is a resolved
    backend name ("torch", "triton", "reference"); the reference backend always gets None (it stays the oracle).
    """

    def __init__(self):
        self._key = None
        self._subnet: Optional[Subnet] = None

    def clear(self) -> None:
        """Forget the cached subnet."""
        self._key, self._subnet = None, None

    def get(self, weight: torch.Tensor, scores: torch.Tensor, prune_rate: float, backend: str) -> Optional[Subnet]:
        from .backends import backend_module

        if backend == "reference":
            return None
        make = getattr(backend_module(backend), "make_subnet", None)
        if make is None:
            return None
        try:
            key = (weight._version, weight.data_ptr(), scores._version, scores.data_ptr(), tuple(weight.shape),
                   float(prune_rate), weight.device, backend)
        except RuntimeError:  # inference-mode tensors carry no version counter: never cache them
            return make(weight, scores, prune_rate)
        if key != self._key:
            self._subnet, self._key = make(weight, scores, prune_rate), key
        return self._subnet
