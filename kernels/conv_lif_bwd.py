"""Backward kernels of the fused binary-weight conv2d + LIF op (issue 4).

Pipeline (launched by ``conv_lif.py``); every tensor channels-last and contiguous, like the forward's (see
``conv_lif_fwd``: unit stride on the channel axis, which is the contiguous axis of every tile):
1. ``conv_lif_bwd_scan_kernel``: per output tile, recompute the current from the saved exact ``y`` and the forward
   LIF scan, parking U[t] in the fp32 gradient buffer ``g`` ``[T, M, C_out]`` (same program, same layout, so each
   thread reads back its own stores); then the reverse BPTT scan overwrites U[t] by ``mult[c] * dL/dI[t]``. In the
   same pass it writes dL/dresidual and the per-channel partial sums of dL/dI and dL/dI * y that scale, shift and
   BatchNorm's backward need. For a direct-encoded input the T gradients are summed in registers and only
   ``sum_t dL/dI[t]`` is stored (slot 0 of ``g``): the image's gradient and the weight gradient both use the sum.
   With ``memory="recompute"`` and no BatchNorm (RECOMPUTE) the same kernel rebuilds each ``y[t]`` with the
   forward's implicit GEMM (``conv_lif_fwd.conv_tile``) instead of loading it, so ``y`` never reaches memory.
2. ``bn_grad_fold_kernel`` (training BatchNorm only): ``g = c1[c] * g + c2[c] * y + c3[c]`` in place, the backward
   of normalising with batch statistics once the host reduced the partial sums.
3. ``conv_grad_input_kernel``: transposed implicit GEMM ``dX = alpha * g (*) tern`` (strides and padding handled by
   masking taps whose output position is not an integer / in range).
4. ``conv_grad_weight_kernel``: implicit GEMM ``dW_eff[co, ci, kh, kw] = sum_{t,n,oh,ow} X * g`` with the
   straight-through epilogue ``dscores = dW_eff * w * sign(s)`` (and ``dweight = dW_eff * alpha * M`` if asked),
   split over the pixel axis into partial results the host adds (the epilogue is linear, so applying it to
   each partial is exact math).
"""
import triton
import triton.language as tl

from .conv_lif_fwd import conv_tile, tile_offsets, tile_ptrs
from .gemm import split_dot_both, split_dot_exact_a, split_dot_exact_b
from .lif import lif_grad_step, lif_step
from .optional import optional_tensors
from .spike_bits import load_bits


@triton.jit
def scan_y(y_ptr, x_ptr, w_ptr, t, off, mask, offs_m, offs_n, N, M, C_in, C_out, H, W, OH, OW, SH, SW, PH, PW,
           RECOMPUTE: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, IS_SPIKE: tl.constexpr,
           DOT_FP16: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The pre-activation tile ``y[t]`` as fp32 (``t = 0`` for a direct input): loaded from the saved ``y``, or
    with RECOMPUTE rebuilt by the forward's own implicit GEMM (``conv_tile``, the forward's tiles: the same exact
    integers for spikes, the same rounding for an analog input)."""
    if RECOMPUTE:
        y = conv_tile(x_ptr, w_ptr, t * N, offs_m, offs_n, M, C_in, C_out, H, W, OH, OW, SH, SW, PH, PW,
                      KH, KW, IS_SPIKE, DOT_FP16, EVEN_K, EVEN_N, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        y = tl.load(tile_ptrs(y_ptr, off, EVEN_N), mask=mask, other=0)
    return y.to(tl.float32)


@optional_tensors(HAS_RES="res_ptr", GRAD_RES="gres_ptr", RECOMPUTE=("x_ptr", "w_ptr"))
@triton.jit
def conv_lif_bwd_scan_kernel(
        y_ptr, x_ptr, w_ptr, alpha_ptr, a_ptr, b_ptr, mult_ptr, res_ptr, gout_ptr, g_ptr, gres_ptr, part_ptr,
        T, N, M, C_in, C_out, H, W, OH, OW, SH, SW, PH, PW, decay, threshold, v_reset, sg_alpha,
        DIRECT: tl.constexpr, HAS_RES: tl.constexpr, GRAD_RES: tl.constexpr, RECOMPUTE: tl.constexpr,
        GY: tl.constexpr, HARD_RESET: tl.constexpr, DECAY_INPUT: tl.constexpr, DETACH_RESET: tl.constexpr,
        SURROGATE: tl.constexpr, EVEN_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        KH: tl.constexpr = 1, KW: tl.constexpr = 1, IS_SPIKE: tl.constexpr = True, DOT_FP16: tl.constexpr = False,
        EVEN_K: tl.constexpr = True, BLOCK_K: tl.constexpr = 32):
    """Recompute + reverse LIF scan of one ``[BLOCK_M, BLOCK_N]`` output tile (see module docstring, step 1).

    All of ``y``, ``res``, ``gout`` (dL/dspikes), ``g``, ``gres`` are channels-last ``[T, M, C_out]`` (``y``:
    ``[1, M, C_out]`` when DIRECT); a ``res`` of dtype uint8 is a spiking residual as the forward kernel saved it,
    bits ``[T*M, cdiv(C_out, 8)]`` (kernels/spike_bits.py), unpacked in the load. Writes ``g`` (fp32; only slot 0
    when DIRECT), ``gres`` (when GRAD_RES) and ``part`` (fp32 ``[2, cdiv(M, BLOCK_M), C_out]``: partial sums of dL/dI and, when GY, of dL/dI * y; zeros
    without GY: only the scale gradient and BatchNorm read them). HAS_RES / GRAD_RES: ``res`` / ``gres`` passed
    (not None). RECOMPUTE: ``x`` and ``w`` passed (``memory="recompute"``), ``y`` None: every ``y[t]`` is rebuilt
    from the forward's input ``x`` (channels-last, as the forward read it) and K-major ternary weight ``w`` by the
    forward's GEMM (``conv_tile``; KH..BLOCK_K and the geometry ints as the forward launched it), once per step in
    the forward sweep and, with GY, once more in the reverse sweep, so ``y`` never reaches memory. Without
    RECOMPUTE the geometry ints and GEMM constexprs are unused.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < C_out
    alpha = tl.load(alpha_ptr).to(tl.float32)
    a = tl.load(a_ptr + offs_n, mask=n_ok, other=0.0)
    b = tl.load(b_ptr + offs_n, mask=n_ok, other=0.0)
    mult = tl.load(mult_ptr + offs_n, mask=n_ok, other=0.0)
    if DIRECT:
        off0, mask0 = tile_offsets(0, offs_m, offs_n, M, C_out, EVEN_N)
        y0 = scan_y(y_ptr, x_ptr, w_ptr, 0, off0, mask0, offs_m, offs_n, N, M, C_in, C_out, H, W, OH, OW, SH, SW,
                    PH, PW, RECOMPUTE, KH, KW, IS_SPIKE, DOT_FP16, EVEN_K, EVEN_N, BLOCK_M, BLOCK_N, BLOCK_K)
        base = (y0 * alpha) * a[None, :] + b[None, :]
    v = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for t in range(T):
        off, mask = tile_offsets(t, offs_m, offs_n, M, C_out, EVEN_N)
        if DIRECT:
            cur = base
        else:
            y = scan_y(y_ptr, x_ptr, w_ptr, t, off, mask, offs_m, offs_n, N, M, C_in, C_out, H, W, OH, OW, SH, SW,
                       PH, PW, RECOMPUTE, KH, KW, IS_SPIKE, DOT_FP16, EVEN_K, EVEN_N, BLOCK_M, BLOCK_N, BLOCK_K)
            cur = (y * alpha) * a[None, :] + b[None, :]
        if HAS_RES:
            if res_ptr.dtype.element_ty == tl.uint8:  # a spiking residual, as bits the forward kernel wrote
                cur += load_bits(res_ptr, (t * M + offs_m)[:, None], offs_n[None, :], C_out, mask).to(tl.float32)
            else:
                cur += tl.load(tile_ptrs(res_ptr, off, EVEN_N), mask=mask, other=0.0).to(tl.float32)
        u, spike, v = lif_step(v, cur, decay, threshold, v_reset, HARD_RESET, DECAY_INPUT)
        tl.store(tile_ptrs(g_ptr, off, EVEN_N), u, mask=mask)
    tl.debug_barrier()
    grad_v = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # Per-element accumulators, reduced over rows once after the loop (a cross-warp reduction per step costs
    # shared-memory round trips and made ptxas spill).
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_gy = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for i in range(T):
        t = T - 1 - i
        off, mask = tile_offsets(t, offs_m, offs_n, M, C_out, EVEN_N)
        u = tl.load(tile_ptrs(g_ptr, off, EVEN_N), mask=mask, other=0.0)
        spike = (u >= threshold).to(tl.float32)
        grad_spike = tl.load(tile_ptrs(gout_ptr, off, EVEN_N), mask=mask, other=0.0).to(tl.float32)
        grad_cur, grad_v = lif_grad_step(grad_spike, grad_v, u, spike, decay, threshold, v_reset, sg_alpha,
                                         HARD_RESET, DECAY_INPUT, DETACH_RESET, SURROGATE)
        grad_cur = tl.where(mask, grad_cur, 0.0)
        if GRAD_RES:
            tl.store(tile_ptrs(gres_ptr, off, EVEN_N), grad_cur.to(gres_ptr.dtype.element_ty), mask=mask)
        acc_g += grad_cur
        if not DIRECT:
            if GY:
                y = scan_y(y_ptr, x_ptr, w_ptr, t, off, mask, offs_m, offs_n, N, M, C_in, C_out, H, W, OH, OW, SH,
                           SW, PH, PW, RECOMPUTE, KH, KW, IS_SPIKE, DOT_FP16, EVEN_K, EVEN_N, BLOCK_M, BLOCK_N,
                           BLOCK_K)
                acc_gy += grad_cur * y
            tl.store(tile_ptrs(g_ptr, off, EVEN_N), grad_cur * mult[None, :], mask=mask)
    off0, mask0 = tile_offsets(0, offs_m, offs_n, M, C_out, EVEN_N)
    if DIRECT:
        if GY:
            # reload (or rebuild) y rather than keep it live across both scans
            y0 = scan_y(y_ptr, x_ptr, w_ptr, 0, off0, mask0, offs_m, offs_n, N, M, C_in, C_out, H, W, OH, OW, SH,
                        SW, PH, PW, RECOMPUTE, KH, KW, IS_SPIKE, DOT_FP16, EVEN_K, EVEN_N, BLOCK_M, BLOCK_N,
                        BLOCK_K)
            acc_gy = acc_g * y0
        tl.store(tile_ptrs(g_ptr, off0, EVEN_N), acc_g * mult[None, :], mask=mask0)
    sum_g = tl.sum(acc_g, 0)
    sum_gy = tl.sum(acc_gy, 0)
    num_pid_m = tl.num_programs(0)
    tl.store(part_ptr + pid_m * C_out + offs_n, sum_g, mask=n_ok)
    tl.store(part_ptr + (num_pid_m + pid_m) * C_out + offs_n, sum_gy, mask=n_ok)


@triton.jit
def bn_grad_fold_kernel(g_ptr, y_ptr, c1_ptr, c2_ptr, c3_ptr, numel, C_out, BLOCK: tl.constexpr):
    """In place over the flat channel-innermost ``g`` (fp32) with ``y`` of the same shape: ``g = c1*g + c2*y + c3``.

    The BatchNorm backward through the batch statistics, shared by the conv and linear layers."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    c = offs % C_out
    g = tl.load(g_ptr + offs, mask=ok, other=0.0)
    y = tl.load(y_ptr + offs, mask=ok, other=0).to(tl.float32)
    c1 = tl.load(c1_ptr + c, mask=ok, other=0.0)
    c2 = tl.load(c2_ptr + c, mask=ok, other=0.0)
    c3 = tl.load(c3_ptr + c, mask=ok, other=0.0)
    tl.store(g_ptr + offs, c1 * g + c2 * y + c3, mask=ok)


@triton.jit
def conv_grad_input_kernel(
        g_ptr, wt_ptr, alpha_ptr, dx_ptr,
        P, C_in, C_out, H, W, OH, OW, SH, SW, PH, PW,
        KH: tl.constexpr, KW: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr = True):
    """dX[f, ih, iw, ci] = alpha * sum_{kh, kw, co} g[f, oh, ow, co] * tern[kh, kw, ci, co] with ih = oh*SH - PH + kh.

    Rows: the ``P = F*H*W`` input pixels (F frames); cols: input channels. ``g`` fp32 ``[F, OH, OW, C_out]``;
    ``wt`` the ternary weight as int8 ``[KH, KW, C_out, C_in]``; ``dX`` ``[F, H, W, C_in]``.
    EVEN_K: C_out % BLOCK_K == 0; EVEN_N: C_in % BLOCK_N == 0. Tensor-core dots: g split into bf16 hi + lo when
    SPLIT (``grad_precision="split"``), hi alone otherwise; the ternary weight is exact in bf16 (kernels/gemm.py).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < P
    n_ok = offs_n < C_in
    hw = H * W
    frame = offs_m // hw
    rem = offs_m - frame * hw
    ih = rem // W
    iw = rem - ih * W
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    num_kb = tl.cdiv(C_out, BLOCK_K)
    for kk in range(0, KH * KW * num_kb):
        tap = kk // num_kb
        co = (kk - tap * num_kb) * BLOCK_K + offs_k
        kh = tap // KW
        kw = tap - kh * KW
        oh_num = ih + PH - kh
        ow_num = iw + PW - kw
        oh = oh_num // SH
        ow = ow_num // SW
        pix_ok = m_ok & (oh_num >= 0) & (oh * SH == oh_num) & (oh < OH) & (ow_num >= 0) & (ow * SW == ow_num) \
            & (ow < OW)
        g_ptrs = g_ptr + (((frame * OH + oh) * OW + ow) * C_out)[:, None] + co[None, :]
        w_ptrs = wt_ptr + ((tap * C_out + co) * C_in)[:, None] + offs_n[None, :]
        if EVEN_K:
            g_tile = tl.load(tl.multiple_of(g_ptrs, [16, 16]), mask=pix_ok[:, None], other=0.0)
        else:
            g_tile = tl.load(g_ptrs, mask=pix_ok[:, None] & (co < C_out)[None, :], other=0.0)
        if EVEN_K and EVEN_N:
            w_tile = tl.load(tl.multiple_of(w_ptrs, [16, 16]))
        else:
            w_tile = tl.load(w_ptrs, mask=(co < C_out)[:, None] & n_ok[None, :], other=0)
        acc = split_dot_exact_b(g_tile, w_tile, acc, SPLIT)
    alpha = tl.load(alpha_ptr).to(tl.float32)
    dx_ptrs = dx_ptr + (offs_m * C_in)[:, None] + offs_n[None, :]
    if EVEN_N:
        tl.store(tl.multiple_of(dx_ptrs, [16, 16]), (acc * alpha).to(dx_ptr.dtype.element_ty), mask=m_ok[:, None])
    else:
        tl.store(dx_ptrs, (acc * alpha).to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@optional_tensors(GRAD_SCORES=("gs_ptr", "w_ptr", "s_ptr"), GRAD_WEIGHT="gw_ptr")
@triton.jit
def conv_grad_weight_kernel(
        x_ptr, g_ptr, w_ptr, s_ptr, tern_ptr, alpha_ptr, gs_ptr, gw_ptr,
        P, C_in, C_out, H, W, OH, OW, p_per_split, SH, SW, PH, PW,
        KH: tl.constexpr, KW: tl.constexpr, GRAD_SCORES: tl.constexpr, GRAD_WEIGHT: tl.constexpr,
        EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr = True):
    """dW_eff tile for one tap: rows = input channels, cols = output channels, reduced over the pixels
    ``p in [split * p_per_split, ...)`` of ``P = F * M`` (F frames of M output pixels).

    ``x`` channels-last ``[F, H, W, C_in]`` (int8 spikes, or float), or spikes as uint8 bits ``[F*H*W,
    cdiv(C_in, 8)]`` unpacked in the load (kernels/spike_bits.py); ``g`` fp32 ``[F, M, C_out]``. Writes the
    straight-through gradients of split ``program_id(2)`` into ``gs`` / ``gw`` ``[SPLIT, C_out, C_in, KH, KW]``
    (fp32); GRAD_SCORES: ``gs`` passed (with ``w``, ``s``), GRAD_WEIGHT: ``gw`` passed. EVEN_M: C_in % BLOCK_M == 0; EVEN_N: C_out % BLOCK_N == 0. Tensor-core dots (kernels/gemm.py): g split
    into bf16 hi + lo when SPLIT, hi alone otherwise; int8 spikes are exact in bf16, an analog ``x`` is split too
    (three dots when SPLIT).
    """
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    num_c_tiles = tl.cdiv(C_in, BLOCK_M)
    tap = pid_r // num_c_tiles
    kh = tap // KW
    kw = tap - kh * KW
    offs_c = (pid_r - tap * num_c_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    c_ok = offs_c < C_in
    n_ok = offs_n < C_out
    ohw = OH * OW
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    p_begin = pid_s * p_per_split
    p_end = tl.minimum(p_begin + p_per_split, P)
    for p0 in range(p_begin, p_end, BLOCK_K):
        p = p0 + offs_k
        p_ok = p < p_end
        frame = p // ohw  # frames of x and g coincide: both are (t, n) or n alone
        rem = p - frame * ohw
        oh = rem // OW
        ow = rem - oh * OW
        ih = oh * SH - PH + kh
        iw = ow * SW - PW + kw
        pix_ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        pixel = (frame * H + ih) * W + iw
        x_ptrs = x_ptr + (pixel * C_in)[None, :] + offs_c[:, None]
        g_ptrs = g_ptr + (p * C_out)[:, None] + offs_n[None, :]
        if x_ptr.dtype.element_ty == tl.uint8:  # spikes saved as bits (kernels/spike_bits.py)
            x_tile = load_bits(x_ptr, pixel[None, :], offs_c[:, None], C_in, c_ok[:, None] & pix_ok[None, :])
        elif EVEN_M:
            x_tile = tl.load(tl.multiple_of(x_ptrs, [16, 16]), mask=pix_ok[None, :], other=0)
        else:
            x_tile = tl.load(x_ptrs, mask=c_ok[:, None] & pix_ok[None, :], other=0)
        if EVEN_N:
            g_tile = tl.load(tl.multiple_of(g_ptrs, [16, 16]), mask=p_ok[:, None], other=0.0)
        else:
            g_tile = tl.load(g_ptrs, mask=p_ok[:, None] & n_ok[None, :], other=0.0)
        if x_tile.dtype == tl.int8:
            acc = split_dot_exact_a(x_tile, g_tile, acc, SPLIT)
        else:
            acc = split_dot_both(x_tile, g_tile, acc, SPLIT)
    # Weight layout [C_out, C_in, KH, KW]: row ci, col co.
    w_off = offs_n[None, :] * (C_in * KH * KW) + offs_c[:, None] * (KH * KW) + kh * KW + kw
    ok = c_ok[:, None] & n_ok[None, :]
    out_off = pid_s * (C_out * C_in * KH * KW) + w_off
    if GRAD_SCORES:
        w = tl.load(w_ptr + w_off, mask=ok, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + w_off, mask=ok, other=0.0).to(tl.float32)
        sign_s = tl.where(s > 0, 1.0, tl.where(s < 0, -1.0, 0.0))
        tl.store(gs_ptr + out_off, acc * w * sign_s, mask=ok)
    if GRAD_WEIGHT:
        alpha = tl.load(alpha_ptr).to(tl.float32)
        tern = tl.load(tern_ptr + w_off, mask=ok, other=0)
        tl.store(gw_ptr + out_off, tl.where(tern != 0, acc * alpha, 0.0), mask=ok)


