"""Backward kernels of the fused binary-weight conv2d + LIF op (issue 4).

Pipeline (launched by ``conv_lif.py``), all buffers channels-last like the forward's ``y``:
1. ``conv_lif_bwd_scan_kernel``: per output tile, recompute the current from the saved exact ``y`` and the forward
   LIF scan, parking U[t] in the fp32 gradient buffer ``g`` ``[T, M, C_out]`` (same program, same layout, so each
   thread reads back its own stores); then the reverse BPTT scan overwrites U[t] by ``mult[c] * dL/dI[t]``. In the
   same pass it writes dL/dresidual and the per-channel partial sums of dL/dI and dL/dI * y that scale, shift and
   BatchNorm's backward need. For a direct-encoded input the T gradients are summed in registers and only
   ``sum_t dL/dI[t]`` is stored (slot 0 of ``g``): the image's gradient and the weight gradient both use the sum.
2. ``bn_grad_fold_kernel`` (training BatchNorm only): ``g = c1[c] * g + c2[c] * y + c3[c]`` in place, the backward
   of normalising with batch statistics once the host reduced the partial sums.
3. ``conv_grad_input_kernel``: transposed implicit GEMM ``dX = alpha * g (*) tern`` (strides and padding handled by
   masking taps whose output position is not an integer / in range).
4. ``conv_grad_weight_kernel``: implicit GEMM ``dW_eff[co, ci, kh, kw] = sum_{t,n,oh,ow} X * g`` with the
   straight-through epilogue ``dscores = dW_eff * w * sign(s)`` (and ``dweight = dW_eff * alpha * M`` if asked),
   split over the pixel axis into partial results the host adds (the epilogue is linear, so applying it to
   each partial is exact math).
"""
import itertools

import triton
import triton.language as tl

from .lif import SURROGATE_CODES, lif_grad_step, lif_step


@triton.jit
def conv_lif_bwd_scan_kernel(
        y_ptr, alpha_ptr, a_ptr, b_ptr, mult_ptr, res_ptr, gout_ptr, g_ptr, gres_ptr, part_ptr,
        T, M, C_out, OH, OW,
        srt, srn, src, srh, srw,
        sgt, sgn, sgc, sgh, sgw,
        sqt, sqn, sqc, sqh, sqw,
        decay, threshold, v_reset, sg_alpha,
        DIRECT: tl.constexpr, HAS_RES: tl.constexpr, GRAD_RES: tl.constexpr,
        HARD_RESET: tl.constexpr, DECAY_INPUT: tl.constexpr, DETACH_RESET: tl.constexpr,
        SURROGATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Recompute + reverse LIF scan of one ``[BLOCK_M, BLOCK_N]`` output tile (see module docstring, step 1).

    Writes ``g`` (fp32 ``[T, M, C_out]``; only slot 0 when DIRECT), ``gres`` (dL/dresidual, any strides, when
    GRAD_RES) and ``part`` (fp32 ``[2, cdiv(M, BLOCK_M), C_out]``: partial sums of dL/dI and dL/dI * y).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < C_out
    mask = m_ok[:, None] & n_ok[None, :]
    ohw = OH * OW
    n_img = offs_m // ohw
    rem = offs_m % ohw
    oh = rem // OW
    ow = rem % OW
    res_off = (n_img * srn + oh * srh + ow * srw)[:, None] + offs_n[None, :] * src
    gout_off = (n_img * sgn + oh * sgh + ow * sgw)[:, None] + offs_n[None, :] * sgc
    gres_off = (n_img * sqn + oh * sqh + ow * sqw)[:, None] + offs_n[None, :] * sqc
    tile_off = offs_m[:, None] * C_out + offs_n[None, :]
    step = M * C_out
    alpha = tl.load(alpha_ptr).to(tl.float32)
    a = tl.load(a_ptr + offs_n, mask=n_ok, other=0.0)
    b = tl.load(b_ptr + offs_n, mask=n_ok, other=0.0)
    mult = tl.load(mult_ptr + offs_n, mask=n_ok, other=0.0)
    if DIRECT:
        y = tl.load(y_ptr + tile_off, mask=mask, other=0).to(tl.float32)
        base = (y * alpha) * a[None, :] + b[None, :]
    v = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for t in range(T):
        if DIRECT:
            cur = base
        else:
            y = tl.load(y_ptr + t * step + tile_off, mask=mask, other=0).to(tl.float32)
            cur = (y * alpha) * a[None, :] + b[None, :]
        if HAS_RES:
            cur += tl.load(res_ptr + res_off + t * srt, mask=mask, other=0.0).to(tl.float32)
        u, spike, v = lif_step(v, cur, decay, threshold, v_reset, HARD_RESET, DECAY_INPUT)
        tl.store(g_ptr + t * step + tile_off, u, mask=mask)
    tl.debug_barrier()
    grad_v = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    grad_sum = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    sum_g = tl.zeros([BLOCK_N], dtype=tl.float32)
    sum_gy = tl.zeros([BLOCK_N], dtype=tl.float32)
    for i in range(T):
        t = T - 1 - i
        u = tl.load(g_ptr + t * step + tile_off, mask=mask, other=0.0)
        spike = (u >= threshold).to(tl.float32)
        grad_spike = tl.load(gout_ptr + gout_off + t * sgt, mask=mask, other=0.0).to(tl.float32)
        grad_cur, grad_v = lif_grad_step(grad_spike, grad_v, u, spike, decay, threshold, v_reset, sg_alpha,
                                         HARD_RESET, DECAY_INPUT, DETACH_RESET, SURROGATE)
        grad_cur = tl.where(mask, grad_cur, 0.0)
        if GRAD_RES:
            tl.store(gres_ptr + gres_off + t * sqt, grad_cur.to(gres_ptr.dtype.element_ty), mask=mask)
        if DIRECT:
            grad_sum += grad_cur
        else:
            y = tl.load(y_ptr + t * step + tile_off, mask=mask, other=0).to(tl.float32)
            sum_g += tl.sum(grad_cur, 0)
            sum_gy += tl.sum(grad_cur * y, 0)
            tl.store(g_ptr + t * step + tile_off, grad_cur * mult[None, :], mask=mask)
    if DIRECT:
        sum_g += tl.sum(grad_sum, 0)
        sum_gy += tl.sum(grad_sum * y, 0)
        tl.store(g_ptr + tile_off, grad_sum * mult[None, :], mask=mask)
    num_pid_m = tl.num_programs(0)
    tl.store(part_ptr + pid_m * C_out + offs_n, sum_g, mask=n_ok)
    tl.store(part_ptr + (num_pid_m + pid_m) * C_out + offs_n, sum_gy, mask=n_ok)


@triton.jit
def bn_grad_fold_kernel(g_ptr, y_ptr, c1_ptr, c2_ptr, c3_ptr, numel, C_out, BLOCK: tl.constexpr):
    """In place over the flat channels-last ``g`` (fp32) with ``y`` of the same shape: ``g = c1*g + c2*y + c3``."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
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
        g_ptr, w_ptr, alpha_ptr, dx_ptr,
        P, C_in, C_out, H, W, OH, OW,
        sdf, sdc, sdh, sdw,
        SH, SW, PH, PW,
        KH: tl.constexpr, KW: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dX[t, n, ci, ih, iw] = alpha * sum_{kh, kw, co} g[t, n, oh, ow, co] * tern[kh, kw, ci, co], with
    ih = oh*SH - PH + kh. Rows: the ``P = T_g*N*H*W`` input pixels; cols: input channels. ``g`` fp32
    ``[T_g, N, OH, OW, C_out]``; ``dX`` written with strides ``sdf`` (one frame = one (t, n) image), ``sdc``,
    ``sdh``, ``sdw``."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < P
    n_ok = offs_n < C_in
    hw = H * W
    frame = offs_m // hw  # t * N + n
    rem = offs_m % hw
    ih = rem // W
    iw = rem % W
    g_frame = g_ptr + frame * (OH * OW * C_out)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kh in tl.static_range(KH):
        oh_num = ih + PH - kh
        oh = oh_num // SH
        h_ok = m_ok & (oh_num >= 0) & (oh * SH == oh_num) & (oh < OH)
        for kw in tl.static_range(KW):
            ow_num = iw + PW - kw
            ow = ow_num // SW
            pix_ok = h_ok & (ow_num >= 0) & (ow * SW == ow_num) & (ow < OW)
            g_pix = g_frame + (oh * OW + ow) * C_out
            w_tap = w_ptr + (kh * KW + kw) * C_in * C_out
            for c0 in range(0, C_out, BLOCK_K):
                co = c0 + offs_k
                co_ok = co < C_out
                g_tile = tl.load(g_pix[:, None] + co[None, :], mask=pix_ok[:, None] & co_ok[None, :], other=0.0)
                w_tile = tl.load(w_tap + offs_n[None, :] * C_out + co[:, None],
                                 mask=co_ok[:, None] & n_ok[None, :], other=0)
                acc += tl.dot(g_tile, w_tile.to(tl.float32), input_precision="ieee")
    alpha = tl.load(alpha_ptr).to(tl.float32)
    dx_off = (frame * sdf + ih * sdh + iw * sdw)[:, None] + offs_n[None, :] * sdc
    tl.store(dx_ptr + dx_off, (acc * alpha).to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def conv_grad_weight_kernel(
        x_ptr, g_ptr, w_ptr, s_ptr, tern_ptr, alpha_ptr, gs_ptr, gw_ptr,
        P, M, C_in, C_out, H, W, OH, OW, p_per_split,
        sxt, sxn, sxh, sxw, sxc,
        SH, SW, PH, PW,
        KH: tl.constexpr, KW: tl.constexpr, GRAD_SCORES: tl.constexpr, GRAD_WEIGHT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dW_eff tile for one tap: rows = input channels, cols = output channels, reduced over the pixels
    ``p in [split * p_per_split, ...)`` of ``P = T_g * M``; writes the straight-through gradients of split
    ``program_id(2)`` into ``gs`` / ``gw`` ``[SPLIT, C_out, C_in, KH, KW]`` (fp32)."""
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    num_c_tiles = tl.cdiv(C_in, BLOCK_M)
    tap = pid_r // num_c_tiles
    kh = tap // KW
    kw = tap % KW
    offs_c = (pid_r % num_c_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
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
        t = p // M
        m = p % M
        n_img = m // ohw
        rem = m % ohw
        ih = (rem // OW) * SH - PH + kh
        iw = (rem % OW) * SW - PW + kw
        pix_ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_pix = x_ptr + t * sxt + n_img * sxn + ih * sxh + iw * sxw
        x_tile = tl.load(x_pix[None, :] + offs_c[:, None] * sxc, mask=c_ok[:, None] & pix_ok[None, :], other=0)
        g_tile = tl.load(g_ptr + p[:, None] * C_out + offs_n[None, :], mask=p_ok[:, None] & n_ok[None, :],
                         other=0.0)
        acc += tl.dot(x_tile.to(tl.float32), g_tile, input_precision="ieee")
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
