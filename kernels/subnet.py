"""Ternary subnet weights in Triton: W_eff / alpha as int8 (-1, 0, +1) plus the scalar alpha.

Per layer (design.md section 3): n_pruned = floor(p * numel) weights with the smallest |scores| are
removed (M = 0), alpha = sum(|w| * M) / sum(M), W_eff = alpha * M * sign(w).

The threshold tau = the n_pruned-th smallest |score| comes from ``torch.kthvalue`` in the launcher;
one Triton pass then writes tern = sign(w) * (|s| > tau) as int8 and per-program partial sums of
|w| * M (in fp64, as binwslt.subnet sums) and of M. Partials (not atomics) keep alpha deterministic;
they are summed on the host in fp64, so alpha rounds to the same float32 as binwslt.subnet's. If
scores tie at tau, "|s| > tau" keeps a different count than numel - n_pruned; the tie-break rule
(by flat index) then needs a sort, so that rare case falls back to ``binwslt.subnet.ternary_subnet``
and the result matches it exactly.
"""

import torch
import triton
import triton.language as tl

from .tiles import SUBNET_BLOCK, SUBNET_NUM_WARPS


@triton.jit
def ternary_subnet_kernel(weight_ptr, scores_ptr, tern_ptr, abs_sum_ptr, kept_ptr, numel, tau,
                          BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(scores_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    keep = (tl.abs(s) > tau) & mask
    sign = (w > 0).to(tl.int8) - (w < 0).to(tl.int8)
    tern = tl.where(keep, sign, 0).to(tl.int8)
    tl.store(tern_ptr + offs, tern, mask=mask)
    tl.store(abs_sum_ptr + pid, tl.sum(tl.where(keep, tl.abs(w), 0.0).to(tl.float64), axis=0))
    tl.store(kept_ptr + pid, tl.sum(keep.to(tl.int32), axis=0))


def _n_pruned(numel, prune_rate):
    from binwslt.subnet import n_pruned

    return n_pruned(numel, prune_rate)


def ternary_subnet(weight, scores, prune_rate):
    """Ternary subnet weight of one layer.

    weight: frozen float tensor (any shape); scores: float tensor of the same shape; prune_rate: float
    in [0, 1), the fraction removed. Returns (tern, alpha): tern int8 of weight's shape with values in
    {-1, 0, 1} (= sign(w) * M), alpha a 0-dim float32 tensor (sum |w| M / sum M) on weight's device.
    Equal to binwslt.subnet.ternary_subnet(weight, scores, prune_rate).
    """
    if weight.shape != scores.shape:
        raise ValueError(f"scores shape {tuple(scores.shape)} must equal weight shape {tuple(weight.shape)}")
    if not (weight.is_floating_point() and scores.is_floating_point()):
        raise TypeError(f"weight and scores must be floating tensors, got {weight.dtype} and {scores.dtype}")
    numel = weight.numel()
    n_pruned = _n_pruned(numel, prune_rate)
    if numel == 0 or n_pruned >= numel:
        from binwslt.subnet import ternary_subnet as torch_ternary_subnet

        return torch_ternary_subnet(weight, scores, prune_rate)
    w = weight.detach().contiguous().reshape(-1)
    s = scores.detach().contiguous().reshape(-1)
    if n_pruned == 0:
        tau = -1.0  # keeps every weight (|s| >= 0 > -1)
    else:
        tau = float(torch.kthvalue(s.abs().float(), n_pruned).values)
    num_programs = triton.cdiv(numel, SUBNET_BLOCK)
    tern = torch.empty(numel, dtype=torch.int8, device=w.device)
    abs_sums = torch.empty(num_programs, dtype=torch.float64, device=w.device)
    kept = torch.empty(num_programs, dtype=torch.int32, device=w.device)
    ternary_subnet_kernel[(num_programs,)](w, s, tern, abs_sums, kept, numel, tau,
                                           BLOCK=SUBNET_BLOCK, num_warps=SUBNET_NUM_WARPS)
    n_kept = int(kept.sum())
    if n_kept != numel - n_pruned:
        from binwslt.subnet import ternary_subnet as torch_ternary_subnet

        return torch_ternary_subnet(weight, scores, prune_rate)
    alpha = (abs_sums.sum() / n_kept).float()
    return tern.reshape(weight.shape), alpha


__all__ = ["ternary_subnet", "ternary_subnet_kernel"]
