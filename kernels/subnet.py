"""Ternary subnet weights in Triton: a multi-block radix select of the pruning threshold, all on the device.

Per layer (docs/design.md §3): n_pruned = floor(p * numel) weights with the smallest |scores| are removed
(M = 0; ties at the threshold: the lower flat index is pruned first), alpha = sum(|w| * M) / sum(M),
W_eff = alpha * M * sign(w).

Selection without a sort and without a host sync. |s| is read as float32 (exact for fp16/bf16 scores) and its
bit pattern as an int32 key: for non-negative floats the key order is the value order. The n_pruned-th smallest
key is found digit by digit, 8 bits at a time from the top (four passes):
1. ``radix_histogram_kernel`` (every block of the scores): a 256-bin histogram of the current digit over the keys
   whose higher digits equal the prefix found so far, added to a global histogram (one atomic per bin and block);
2. ``radix_select_kernel`` (one program): the bin holding the remaining rank; it extends the prefix and lowers
   the rank by the keys in the bins below. The prefix and the rank live in a 2-element device tensor ``state``.
After the last pass ``state = [tau, r]``: tau is the threshold key and r how many keys equal to tau are pruned.
3. ``tie_count_kernel``: per block, the number of keys equal to tau; an exclusive cumulative sum over the blocks
   (torch, on the device) gives each block the number of ties before it;
4. ``subnet_write_kernel``: keep = key > tau, or key == tau with tie rank >= r (rank by flat index: the block's
   offset plus an in-block cumulative sum); writes tern = sign(w) * keep as int8. alpha = fp64 sum of |w| * M /
   (numel - n_pruned) (a host integer), reduced on the device: the same float32 as binwslt.subnet's.
Work: five reads of the scores and one of the weight, ~10 launches, no host round trip, every block busy.
"""
import torch
import triton
import triton.language as tl

from binwslt.subnet import Subnet, n_pruned as _n_pruned

from .tiles import SUBNET_BLOCK, SUBNET_NUM_WARPS

RADIX_BITS = 8
RADIX_BINS = 1 << RADIX_BITS
RADIX_SHIFTS = (24, 16, 8, 0)


@triton.jit
def abs_key(scores_ptr, offs, mask):
    """int32 key of |s| (float32 bit pattern; ordered like the values for non-negative floats). 0 where masked."""
    s = tl.load(scores_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return tl.abs(s).to(tl.int32, bitcast=True)


@triton.jit
def radix_histogram_kernel(scores_ptr, hist_ptr, state_ptr, numel, SHIFT: tl.constexpr, BLOCK: tl.constexpr):
    # hist [256] int32 (zeroed by the host); state [2] int32 = (prefix, rank).
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    key = abs_key(scores_ptr, offs, mask)
    digit = (key >> SHIFT) & 255
    if SHIFT == 24:
        match = mask
    else:
        prefix = tl.load(state_ptr)
        match = mask & ((key >> (SHIFT + 8)) == (prefix >> (SHIFT + 8)))
    counts = tl.histogram(tl.where(match, digit, 256), 512)  # bins 256.. collect the keys that do not match
    bins = tl.arange(0, 512)
    tl.atomic_add(hist_ptr + bins, counts, mask=bins < 256)


@triton.jit
def radix_select_kernel(hist_ptr, state_ptr, SHIFT: tl.constexpr):
    # One program: the bin of the rank-th smallest matching key; prefix |= bin << SHIFT, rank -= keys below it.
    bins = tl.arange(0, 256)
    counts = tl.load(hist_ptr + bins)
    cum = tl.cumsum(counts, 0)
    prefix = tl.load(state_ptr)
    rank = tl.load(state_ptr + 1)
    sel = tl.sum((cum < rank).to(tl.int32), 0)
    below = tl.sum(tl.where(bins < sel, counts, 0), 0)
    tl.store(state_ptr, prefix | (sel << SHIFT))
    tl.store(state_ptr + 1, rank - below)


@triton.jit
def tie_count_kernel(scores_ptr, state_ptr, ties_ptr, numel, BLOCK: tl.constexpr):
    # ties [programs] int32: keys equal to the threshold key state[0] in each block.
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    key = abs_key(scores_ptr, offs, mask)
    tl.store(ties_ptr + pid, tl.sum(((key == tl.load(state_ptr)) & mask).to(tl.int32), 0))


@triton.jit
def subnet_write_kernel(weight_ptr, scores_ptr, state_ptr, tie_offset_ptr, tern_ptr, numel, BLOCK: tl.constexpr):
    # tern [numel] int8 = sign(w) * keep.
    # tie_offset [programs] int32: ties (keys == state[0]) in the blocks before this one.
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    key = abs_key(scores_ptr, offs, mask)
    tau = tl.load(state_ptr)
    ties_pruned = tl.load(state_ptr + 1)
    tie = (key == tau) & mask
    rank = tl.load(tie_offset_ptr + pid) + tl.cumsum(tie.to(tl.int32), 0) - 1
    keep = mask & ((key > tau) | (tie & (rank >= ties_pruned)))
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sign = (w > 0).to(tl.int8) - (w < 0).to(tl.int8)
    tl.store(tern_ptr + offs, tl.where(keep, sign, 0).to(tl.int8), mask=mask)


def select_threshold(s: torch.Tensor, k: int) -> torch.Tensor:
    """Device tensor ``[tau, r]`` (int32): tau the int32 key of the k-th smallest |s| (k >= 1), r how many keys
    equal to tau are among the k smallest (prune the r lowest-indexed ties). ``s``: flat contiguous float tensor."""
    numel = s.numel()
    grid = (triton.cdiv(numel, SUBNET_BLOCK),)
    state = torch.zeros(2, dtype=torch.int32, device=s.device)
    state[1:].fill_(k)
    hist = torch.zeros((len(RADIX_SHIFTS), RADIX_BINS), dtype=torch.int32, device=s.device)
    for i, shift in enumerate(RADIX_SHIFTS):
        radix_histogram_kernel[grid](s, hist[i], state, numel, SHIFT=shift, BLOCK=SUBNET_BLOCK,
                                     num_warps=SUBNET_NUM_WARPS)
        radix_select_kernel[(1,)](hist[i], state, SHIFT=shift, num_warps=4)
    return state


def ternary_subnet(weight, scores, prune_rate):
    """Ternary subnet weight of one layer, with no host synchronisation.

    weight: frozen float tensor (any shape); scores: float tensor of the same shape; prune_rate: float in [0, 1),
    the fraction removed. Returns (tern, alpha): tern int8 of weight's shape with values in {-1, 0, 1}
    (= sign(w) * M), alpha a 0-dim float32 tensor (sum |w| M / sum M) on weight's device. Equal to
    binwslt.subnet.ternary_subnet(weight, scores, prune_rate), ties included.
    """
    if weight.shape != scores.shape:
        raise ValueError(f"scores shape {tuple(scores.shape)} must equal weight shape {tuple(weight.shape)}")
    if not (weight.is_floating_point() and scores.is_floating_point()):
        raise TypeError(f"weight and scores must be floating tensors, got {weight.dtype} and {scores.dtype}")
    numel = weight.numel()
    k = _n_pruned(numel, prune_rate)
    if numel == 0:
        from binwslt.subnet import ternary_subnet as torch_ternary_subnet

        return torch_ternary_subnet(weight, scores, prune_rate)
    if numel > 2 ** 31 - 1:
        raise ValueError(f"weight has {numel} elements; the Triton subnet kernels count in int32")
    w = weight.detach().contiguous().reshape(-1)
    s = scores.detach().contiguous().reshape(-1)
    device = w.device
    programs = triton.cdiv(numel, SUBNET_BLOCK)
    if k == 0:  # keep everything: a threshold key below every |s| key, no ties to prune
        state = torch.full((2,), -1, dtype=torch.int32, device=device)
        state[1:].fill_(0)
        tie_offset = torch.zeros(programs, dtype=torch.int32, device=device)
    else:
        state = select_threshold(s, k)
        ties = torch.empty(programs, dtype=torch.int32, device=device)
        tie_count_kernel[(programs,)](s, state, ties, numel, BLOCK=SUBNET_BLOCK, num_warps=SUBNET_NUM_WARPS)
        tie_offset = (torch.cumsum(ties, 0, dtype=torch.int32) - ties).contiguous()
    tern = torch.empty(numel, dtype=torch.int8, device=device)
    subnet_write_kernel[(programs,)](w, s, state, tie_offset, tern, numel, BLOCK=SUBNET_BLOCK,
                                     num_warps=SUBNET_NUM_WARPS)
    # alpha as binwslt.subnet forms it (fp64 sum of |w| over the kept weights; the kept count is a host integer).
    # In torch rather than as per-block fp64 partials in the kernel: ptxas spilled that fp64 block reduction on sm_90.
    alpha = ((w.abs().to(torch.float64) * (tern != 0)).sum() / (numel - k)).to(torch.float32)
    return tern.reshape(weight.shape), alpha


def make_subnet(weight, scores, prune_rate) -> Subnet:
    """The layer's `binwslt.subnet.Subnet` for backend="triton" (cached by the nn modules' SubnetCache).

    ``ternary``: int8 ``[*weight.shape]`` (the weight's own layout); ``alpha``: 0-dim float32 on the device.
    The launchers keep the layouts they derive from it (e.g. the conv kernels' K-major weight) in
    ``Subnet.derived``, so a cached subnet carries them from call to call.
    """
    tern, alpha = ternary_subnet(weight, scores, prune_rate)
    return Subnet(ternary=tern, alpha=alpha)


__all__ = ["ternary_subnet", "make_subnet", "select_threshold", "radix_histogram_kernel", "radix_select_kernel",
           "tie_count_kernel", "subnet_write_kernel"]
