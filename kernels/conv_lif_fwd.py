"""Forward kernels of the fused binary-weight conv2d + LIF op (issue 3).

Every tensor a kernel touches is channels-last and contiguous (the launcher in ``conv_lif.py`` makes it so):
- input ``x`` ``[T, N, H, W, C_in]`` (0/1 spikes in int8 or in the float dtype a fused layer returned them in,
  converted to int8 in registers; or fp16/fp32 analog); a direct-encoded image is ``[N, H, W, C_in]``.
- ternary weight: int8 ``[KH, KW, C_out, C_in]`` (K-major: the reduction axis C_in contiguous, as the int8 tensor-core
  MMA reads it; the grad-input GEMM reads the same tensor).
- output spikes, residual, pre-activation ``y``: ``[T, N*OH*OW, C_out]`` (``y``: ``T_y = 1`` when direct; int16/int32
  exact integers for spike input, fp32 for analog input; stored only when autograd or BatchNorm needs it).
Why channels-last: the GEMM's reduction axis (C_in) and the output tile's column axis (C_out) are then the
contiguous ones, so every im2col row, weight row and output row a program touches is one coalesced, vectorisable
access with unit stride known to the compiler; in NCHW the output tile would be a scatter of single elements at
stride OH*OW (the register cost of per-element 64-bit addresses was measured: it spilled).

The current is ``I[t] = (alpha * y) * a[c] + b[c] (+ residual[t])``: ``a, b`` per output channel fp32 (scale/shift,
or training BatchNorm folded by the host), ``alpha`` the subnet gain (read from a 1-element tensor so the host
never syncs on it). ``alpha * y`` first mirrors the reference (which convolves with ``alpha * tern``), so dyadic
inputs give bit-identical spikes.
"""
import triton
import triton.language as tl

from .gemm import split_dot_exact_b
from .lif import lif_step
from .spike_bits import load_bits, pack_bits_rows
from .optional import optional_tensors


@triton.jit
def conv_tile(x_ptr, w_ptr, frame0, offs_m, offs_n, M, C_in, C_out, H, W, OH, OW, SH, SW, PH, PW,
              KH: tl.constexpr, KW: tl.constexpr, IS_SPIKE: tl.constexpr, DOT_FP16: tl.constexpr,
              EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Implicit-GEMM tile of conv(X, tern) for the frames ``frame0 + n`` of channels-last ``x``: rows = output
    pixels ``offs_m`` (over N*OH*OW), cols = output channels ``offs_n``. EVEN_K: C_in % BLOCK_K == 0; EVEN_N:
    C_out % BLOCK_N == 0 (no channel masks, rows known 16-aligned, so loads vectorise).

    Returns ``[BLOCK_M, BLOCK_N]`` int32 (exact, spike input: int8 x int8 dots) or fp32 (analog input: fp16 dots
    for fp16 input, exact products; fp32 input split into three bf16 terms, fp32 accuracy).
    """
    ohw = OH * OW
    n = offs_m // ohw
    rem = offs_m - n * ohw
    oh = rem // OW
    ow = rem - oh * OW
    m_ok = offs_m < M
    n_ok = offs_n < C_out
    offs_k = tl.arange(0, BLOCK_K)
    frame = frame0 + n
    if IS_SPIKE:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # One flat loop over (tap, channel block) rather than unrolled taps: small code, one software pipeline.
    num_cb = tl.cdiv(C_in, BLOCK_K)
    for kk in range(0, KH * KW * num_cb):
        tap = kk // num_cb
        c = (kk - tap * num_cb) * BLOCK_K + offs_k
        kh = tap // KW
        kw = tap - kh * KW
        ih = oh * SH - PH + kh
        iw = ow * SW - PW + kw
        pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        pixel = (frame * H + ih) * W + iw
        x_ptrs = x_ptr + (pixel * C_in)[:, None] + c[None, :]
        # K-major weight [KH, KW, C_out, C_in]: the tile's reduction axis is the contiguous one, as the int8
        # tensor-core MMA reads both operands, so nothing is transposed through shared memory.
        w_ptrs = w_ptr + ((tap * C_out + offs_n) * C_in)[None, :] + c[:, None]
        if x_ptr.dtype.element_ty == tl.uint8:  # saved spikes as bits (kernels/spike_bits.py): the bwd recompute
            x_tile = load_bits(x_ptr, pixel[:, None], c[None, :], C_in, pix_ok[:, None] & (c < C_in)[None, :])
        elif EVEN_K:
            # rows start at multiples of C_in (a multiple of BLOCK_K >= 16) of a 16-aligned tensor
            x_tile = tl.load(tl.multiple_of(x_ptrs, [16, 16]), mask=pix_ok[:, None], other=0)
        else:
            x_tile = tl.load(x_ptrs, mask=pix_ok[:, None] & (c < C_in)[None, :], other=0)
        if IS_SPIKE:
            x_tile = x_tile.to(tl.int8)  # 0/1 spikes in any dtype (a fused layer's float output): exact in int8
        if EVEN_K and EVEN_N:
            w_tile = tl.load(tl.multiple_of(w_ptrs, [16, 16]))
        else:
            w_tile = tl.load(w_ptrs, mask=(c < C_in)[:, None] & n_ok[None, :], other=0)
        if IS_SPIKE:
            acc += tl.dot(x_tile, w_tile, out_dtype=tl.int32)
        elif DOT_FP16:
            acc += tl.dot(x_tile, w_tile.to(tl.float16), out_dtype=tl.float32)
        else:
            acc = split_dot_exact_b(x_tile, w_tile, acc, True)  # fp32 input: three bf16 terms (kernels/gemm.py)
    return acc


@triton.jit
def tile_offsets(t, offs_m, offs_n, M, C_out, EVEN_N: tl.constexpr):
    """Offsets and mask of an output tile at step ``t`` of a channels-last ``[T, M, C_out]`` tensor. Computed per
    step (not hoisted out of the T loop by hand) so they are not live across the GEMM."""
    row = (t * M + offs_m) * C_out
    if EVEN_N:
        mask = (offs_m < M)[:, None]  # [BLOCK_M, 1]: constant along a row, so row accesses stay vectorised
    else:
        mask = (offs_m < M)[:, None] & (offs_n < C_out)[None, :]
    return row[:, None] + offs_n[None, :], mask


@triton.jit
def tile_ptrs(ptr, off, EVEN_N: tl.constexpr):
    """``ptr + off`` for a tile from ``tile_offsets``; with EVEN_N its rows are known 16-aligned (C_out is a
    multiple of BLOCK_N >= 16, tensors are 16-aligned), which lets row accesses vectorise."""
    if EVEN_N:
        return tl.multiple_of(ptr + off, [16, 16])
    else:
        return ptr + off


@triton.jit
def store_y_and_stats(y, y_ptr, off, mask, sum_y, sum_yy, STORE_Y: tl.constexpr, STATS: tl.constexpr,
                      IS_SPIKE: tl.constexpr, EVEN_N: tl.constexpr, STATS_I32: tl.constexpr):
    """Store the pre-activation tile (for backward / pass 2) and add its per-channel sum and sum of squares
    (exact int64 for spikes). Rows past M hold zeros (masked loads), so they add nothing."""
    if STORE_Y:
        tl.store(tile_ptrs(y_ptr, off, EVEN_N), y.to(y_ptr.dtype.element_ty), mask=mask)
    if STATS:
        if IS_SPIKE and STATS_I32:
            # Column sums in int32, widened once per tile (widening the whole tile first cost ~56 registers);
            # the launcher sets STATS_I32 only when BLOCK_M * fan_in^2 < 2^31 (stats_fit_int32).
            sum_y += tl.sum(y, 0).to(tl.int64)
            sum_yy += tl.sum(y * y, 0).to(tl.int64)
        elif IS_SPIKE:
            y_wide = y.to(tl.int64)
            sum_y += tl.sum(y_wide, 0)
            sum_yy += tl.sum(y_wide * y_wide, 0)
        else:
            sum_y += tl.sum(y, 0)
            sum_yy += tl.sum(y * y, 0)
    return sum_y, sum_yy


@triton.jit
def fire_tile(y, v, off, mask, alpha, a, b, res_ptr, out_ptr, decay, threshold, v_reset,
              HAS_RES: tl.constexpr, HARD_RESET: tl.constexpr, DECAY_INPUT: tl.constexpr, EVEN_N: tl.constexpr):
    """One LIF step of an output tile: current from ``y``, update membrane ``v``, store the spikes at ``off`` of
    ``out`` (channels-last ``[T, M, C_out]``, like ``res``).

    Returns the membrane ``v`` after the step.
    """
    cur = (y.to(tl.float32) * alpha) * a[None, :] + b[None, :]
    if HAS_RES:
        cur += tl.load(tile_ptrs(res_ptr, off, EVEN_N), mask=mask, other=0.0).to(tl.float32)
    u, spike, v = lif_step(v, cur, decay, threshold, v_reset, HARD_RESET, DECAY_INPUT)
    tl.store(tile_ptrs(out_ptr, off, EVEN_N), spike.to(out_ptr.dtype.element_ty), mask=mask)
    return v


@triton.jit
def pack_residual_bits(res_ptr, res_bits_ptr, rows, C_out):
    """Every program of the 2-D grid packs its contiguous share of the spiking residual ``res`` ``[rows, C_out]``
    (0/1 in the caller's float dtype) into the int32 words of ``res_bits`` (kernels/spike_bits.py), before its
    scan (after it, ptxas spilled 8 bytes of the fp32-input 64x16x16 tile on sm_80). A loop of its own rather than
    from the epilogue's residual tiles: packing those bytes in the T loop stored them to shared memory one by one
    (STS.U8, which benchmarks/compile_report.py gates in the int8 forward) and spilled the heaviest int8 tile (1x1,
    64x64x64 on sm_90). The cost is one more read of the residual."""
    pid = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    pack_bits_rows(res_ptr, res_bits_ptr, rows, C_out, pid, tl.num_programs(0) * tl.num_programs(1), 32)


@optional_tensors(FIRE=("out_ptr", "a_ptr", "b_ptr"), HAS_RES="res_ptr", PACK_RES="res_bits_ptr", STORE_Y="y_ptr",
                  STATS="stat_ptr", PACK="bits_ptr")
@triton.jit
def binary_conv_lif_fwd_kernel(
        x_ptr, w_ptr, alpha_ptr, a_ptr, b_ptr, res_ptr, res_bits_ptr, out_ptr, y_ptr, stat_ptr, bits_ptr,
        T, N, M, C_in, C_out, H, W, OH, OW, SH, SW, PH, PW,
        decay, threshold, v_reset,
        KH: tl.constexpr, KW: tl.constexpr, IS_SPIKE: tl.constexpr, DOT_FP16: tl.constexpr, DIRECT: tl.constexpr,
        FIRE: tl.constexpr, HAS_RES: tl.constexpr, PACK_RES: tl.constexpr, STORE_Y: tl.constexpr,
        STATS: tl.constexpr, PACK: tl.constexpr,
        HARD_RESET: tl.constexpr, DECAY_INPUT: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STATS_I32: tl.constexpr = False):
    """Fused conv + LIF over all T steps; each program owns a ``[BLOCK_M pixels, BLOCK_N channels]`` tile.

    FIRE: run the LIF scan in registers and store spikes (the float current never reaches memory).
    STORE_Y: also store the exact pre-activation y for backward / the BatchNorm second pass.
    STATS (BatchNorm pass 1, FIRE off): per-program partial sums of y and y^2 per channel into
    ``stat_ptr`` ``[2, cdiv(M, BLOCK_M), C_out]``.
    DIRECT: the input has no time axis; the convolution runs once and drives all T steps.
    PACK (spike input, for backward): the programs of the first output-channel tile also pack the input spikes
    into ``bits`` (int32 words holding the bytes ``[T*N*H*W, cdiv(C_in, 8)]``, kernels/spike_bits.py), each its
    share, in a
    loop of their own (packing from the GEMM's operand tiles would need one writer per pixel among the taps and a
    second consumer of the MMA operand). ``conv_tile`` also reads such bits (an x of dtype uint8: the backward
    scan's recompute).
    PACK_RES (a spiking residual, for backward; with HAS_RES and FIRE): before its scan every program also packs
    its share of the residual ``[T*M, C_out]`` into ``res_bits`` (int32 words of the bytes ``[T*M, cdiv(C_out,
    8)]``, kernels/spike_bits.py; ``pack_residual_bits``).
    The flags follow from which tensors the launch passes (None: absent; kernels/optional.py): FIRE from
    ``out`` (with ``a, b``), HAS_RES from ``res``, PACK_RES from ``res_bits``, STORE_Y from ``y``, STATS from
    ``stat``, PACK from ``bits``.
    """
    if PACK_RES:  # before the scan: nothing of it is live yet
        pack_residual_bits(res_ptr, res_bits_ptr, T * M, C_out)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < C_out
    if FIRE:
        alpha = tl.load(alpha_ptr).to(tl.float32)
        a = tl.load(a_ptr + offs_n, mask=n_ok, other=0.0)
        b = tl.load(b_ptr + offs_n, mask=n_ok, other=0.0)
    v = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if IS_SPIKE:
        sum_y = tl.zeros([BLOCK_N], dtype=tl.int64)
        sum_yy = tl.zeros([BLOCK_N], dtype=tl.int64)
    else:
        sum_y = tl.zeros([BLOCK_N], dtype=tl.float32)
        sum_yy = tl.zeros([BLOCK_N], dtype=tl.float32)
    if DIRECT:
        y = conv_tile(x_ptr, w_ptr, 0, offs_m, offs_n, M, C_in, C_out, H, W, OH, OW, SH, SW, PH, PW,
                      KH, KW, IS_SPIKE, DOT_FP16, EVEN_K, EVEN_N, BLOCK_M, BLOCK_N, BLOCK_K)
        if STORE_Y or STATS:
            off, mask = tile_offsets(0, offs_m, offs_n, M, C_out, EVEN_N)
            sum_y, sum_yy = store_y_and_stats(y, y_ptr, off, mask, sum_y, sum_yy, STORE_Y, STATS, IS_SPIKE, EVEN_N,
                                               STATS_I32)
        if FIRE:
            for t in range(T):
                off, mask = tile_offsets(t, offs_m, offs_n, M, C_out, EVEN_N)
                v = fire_tile(y, v, off, mask, alpha, a, b, res_ptr, out_ptr, decay, threshold, v_reset,
                              HAS_RES, HARD_RESET, DECAY_INPUT, EVEN_N)
    else:
        for t in range(T):
            y = conv_tile(x_ptr, w_ptr, t * N, offs_m, offs_n, M, C_in, C_out, H, W, OH, OW, SH, SW, PH, PW,
                          KH, KW, IS_SPIKE, DOT_FP16, EVEN_K, EVEN_N, BLOCK_M, BLOCK_N, BLOCK_K)
            off, mask = tile_offsets(t, offs_m, offs_n, M, C_out, EVEN_N)
            sum_y, sum_yy = store_y_and_stats(y, y_ptr, off, mask, sum_y, sum_yy, STORE_Y, STATS, IS_SPIKE, EVEN_N,
                                               STATS_I32)
            if FIRE:
                v = fire_tile(y, v, off, mask, alpha, a, b, res_ptr, out_ptr, decay, threshold, v_reset,
                              HAS_RES, HARD_RESET, DECAY_INPUT, EVEN_N)
    if STATS:
        num_pid_m = tl.num_programs(0)
        tl.store(stat_ptr + pid_m * C_out + offs_n, sum_y, mask=n_ok)
        tl.store(stat_ptr + (num_pid_m + pid_m) * C_out + offs_n, sum_yy, mask=n_ok)
    if PACK:
        if pid_n == 0:
            pack_bits_rows(x_ptr, bits_ptr, T * N * H * W, C_in, pid_m, tl.num_programs(0), 32)


@optional_tensors(HAS_RES="res_ptr", PACK_RES="res_bits_ptr")
@triton.jit
def conv_lif_scan_kernel(
        y_ptr, alpha_ptr, a_ptr, b_ptr, res_ptr, res_bits_ptr, out_ptr,
        T, M, C_out, decay, threshold, v_reset,
        DIRECT: tl.constexpr, HAS_RES: tl.constexpr, PACK_RES: tl.constexpr,
        HARD_RESET: tl.constexpr, DECAY_INPUT: tl.constexpr, EVEN_N: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """LIF scan over a stored pre-activation y ``[T_y, M, C_out]`` (BatchNorm pass 2): same epilogue as the fused
    kernel, with the batch statistics already folded into ``a, b`` by the host. HAS_RES: ``res`` passed (not
    None); PACK_RES: ``res_bits`` passed, the spiking residual's bits written as by the fused kernel."""
    if PACK_RES:
        pack_residual_bits(res_ptr, res_bits_ptr, T * M, C_out)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < C_out
    alpha = tl.load(alpha_ptr).to(tl.float32)
    a = tl.load(a_ptr + offs_n, mask=n_ok, other=0.0)
    b = tl.load(b_ptr + offs_n, mask=n_ok, other=0.0)
    v = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if DIRECT:
        off0, mask0 = tile_offsets(0, offs_m, offs_n, M, C_out, EVEN_N)
        y = tl.load(tile_ptrs(y_ptr, off0, EVEN_N), mask=mask0, other=0)
    for t in range(T):
        off, mask = tile_offsets(t, offs_m, offs_n, M, C_out, EVEN_N)
        if not DIRECT:
            y = tl.load(tile_ptrs(y_ptr, off, EVEN_N), mask=mask, other=0)
        v = fire_tile(y, v, off, mask, alpha, a, b, res_ptr, out_ptr, decay, threshold, v_reset,
                      HAS_RES, HARD_RESET, DECAY_INPUT, EVEN_N)


