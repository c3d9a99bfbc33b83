"""@triton.jit kernels of the fused binary-weight linear + LIF (launched by ``linear_lif.py``).

Shapes: x ``[T_y, N, K]`` (0/1 spikes in int8, fp32, fp16 or bf16, converted to int8 in registers; fp16 or fp32
analog; ``T_y = 1`` for a direct-encoded input), the
ternary weight int8 ``[C, K]`` (values -1/0/+1; K-contiguous like x, so every GEMM tile load is coalesced),
outputs, residual and the pre-activation y ``[T, N, C]`` (C-contiguous).

- ``binary_linear_lif_fwd_kernel``: per [BLOCK_M rows x BLOCK_N channels] tile, all T steps: the K loop (int8 x
  int8 -> int32 for spikes, fp16 dots or the three-term bf16 split for analog input, kernels/gemm.py), I = (alpha*y)*a + b (+ residual[t]) and the
  LIF step in registers; with FIRE=False (BatchNorm pass 1) it stores y and per-program partial sums of y, y^2.
- ``linear_lif_scan_kernel``: BatchNorm pass 2, the LIF scan over the stored y.
- ``linear_lif_bwd_scan_kernel``: recompute U from y (saved, or with ``memory="recompute"`` rebuilt by the
  forward's GEMM from the saved input bits), the reverse BPTT scan, dL/dI (times a per-channel multiplier),
  dL/dresidual and per-program partial sums of dL/dI and dL/dI*y.
- ``linear_grad_input_kernel`` / ``linear_grad_weight_kernel``: dx = alpha * g @ tern; dW_eff = g^T @ x with the
  straight-through epilogue for the scores (and the weight). Both on bf16 tensor cores with the fp32 gradient split
  into three bf16 terms (SPLIT, ``grad_precision="split"``) or one (kernels/gemm.py).
Optional tensors (residual, y, statistics, the gradients nobody asked for) are passed as None and the kernels'
FIRE / HAS_RES / STORE_Y / STATS / GRAD_RES / GRAD_SCORES / GRAD_WEIGHT flags follow from
them (``@optional_tensors``, kernels/optional.py).
"""
import triton
import triton.language as tl

from .gemm import split_dot_both, split_dot_exact_b
from .lif import lif_grad_step, lif_step
from .optional import optional_tensors
from .spike_bits import load_bits, pack_bits_rows


@triton.jit
def linear_tile(x_ptr, tern_ptr, frame, offs_m, offs_n, N, K, C, IS_SPIKE: tl.constexpr, DOT_FP16: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y tile [BLOCK_M, BLOCK_N] = x[frame, offs_m, :] @ tern[offs_n, :]^T (int32 for spikes, else fp32). An x of
    dtype uint8 is the saved spikes as bits (kernels/spike_bits.py rows of cdiv(K, 8) bytes): the backward scan's
    recompute (``memory="recompute"``), unpacked in the load."""
    rows = frame * N + offs_m.to(tl.int64)
    row_mask = offs_m < N
    col_mask = offs_n < C
    if IS_SPIKE:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        if x_ptr.dtype.element_ty == tl.uint8:
            xt = load_bits(x_ptr, rows[:, None], offs_k[None, :], K, row_mask[:, None] & k_mask[None, :])
        else:
            xt = tl.load(x_ptr + rows[:, None] * K + offs_k[None, :], mask=row_mask[:, None] & k_mask[None, :],
                         other=0)
        wt = tl.load(tern_ptr + offs_n.to(tl.int64)[None, :] * K + offs_k[:, None],
                     mask=k_mask[:, None] & col_mask[None, :], other=0)
        if IS_SPIKE:  # 0/1 spikes in any dtype (a fused layer's float output): exact in int8, converted here
            acc = tl.dot(xt.to(tl.int8), wt, acc, out_dtype=tl.int32)
        elif DOT_FP16:
            acc = tl.dot(xt, wt.to(tl.float16), acc)
        else:
            acc = split_dot_exact_b(xt, wt, acc, True)
    return acc


@triton.jit
def linear_fire_tile(y, v, t, offs_m, offs_n, N, C, alpha, a, b, res_ptr, out_ptr,
                     decay, threshold, v_reset, HAS_RES: tl.constexpr,
                     HARD_RESET: tl.constexpr, DECAY_INPUT: tl.constexpr):
    """Current (alpha*y)*a + b (+ residual[t]) -> one LIF step; stores spikes[t]; returns v."""
    mask = (offs_m < N)[:, None] & (offs_n < C)[None, :]
    off = (t * N + offs_m.to(tl.int64))[:, None] * C + offs_n[None, :]
    cur = (y.to(tl.float32) * alpha) * a[None, :] + b[None, :]
    if HAS_RES:
        cur += tl.load(res_ptr + off, mask=mask, other=0.0).to(tl.float32)
    u, spike, v = lif_step(v, cur, decay, threshold, v_reset, HARD_RESET, DECAY_INPUT)
    tl.store(out_ptr + off, spike.to(out_ptr.dtype.element_ty), mask=mask)
    return v


@triton.jit
def linear_y_epilogue(y, t, offs_m, offs_n, N, C, y_ptr, sum_y, sum_yy,
                      IS_SPIKE: tl.constexpr, STORE_Y: tl.constexpr, STATS: tl.constexpr):
    """Store y[t] (int16/int32/fp32 buffer) and accumulate per-channel sums of y and y^2 over the tile's rows."""
    mask = (offs_m < N)[:, None] & (offs_n < C)[None, :]
    if STORE_Y:
        off = (t * N + offs_m.to(tl.int64))[:, None] * C + offs_n[None, :]
        tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)
    if STATS:
        if IS_SPIKE:
            y64 = tl.where(mask, y, 0).to(tl.int64)
            sum_y += tl.sum(y64, axis=0)
            sum_yy += tl.sum(y64 * y64, axis=0)
        else:
            yf = tl.where(mask, y, 0.0)
            sum_y += tl.sum(yf, axis=0)
            sum_yy += tl.sum(yf * yf, axis=0)
    return sum_y, sum_yy


@optional_tensors(FIRE=("out_ptr", "a_ptr", "b_ptr"), HAS_RES="res_ptr", STORE_Y="y_ptr", STATS="stats_ptr",
                  PACK="bits_ptr")
@triton.jit
def binary_linear_lif_fwd_kernel(
        x_ptr, tern_ptr, alpha_ptr, a_ptr, b_ptr, res_ptr, out_ptr, y_ptr, stats_ptr, bits_ptr,
        T, N, K, C, decay, threshold, v_reset,
        IS_SPIKE: tl.constexpr, DOT_FP16: tl.constexpr, DIRECT: tl.constexpr, FIRE: tl.constexpr,
        HAS_RES: tl.constexpr, STORE_Y: tl.constexpr, STATS: tl.constexpr, PACK: tl.constexpr,
        HARD_RESET: tl.constexpr, DECAY_INPUT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Grid: (cdiv(N, BLOCK_M), cdiv(C, BLOCK_N)); every program runs all T steps of its tile. PACK (spike input,
    # for backward): the programs of the first output-channel tile also pack the [T*N, K] input spikes into
    # ``bits`` (int32 words of the kernels/spike_bits.py layout), each its share.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < C
    alpha = tl.load(alpha_ptr)
    if FIRE:
        a = tl.load(a_ptr + offs_n, mask=n_mask, other=0.0)
        b = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0)
    else:
        a = tl.zeros([BLOCK_N], dtype=tl.float32)
        b = tl.zeros([BLOCK_N], dtype=tl.float32)
    if IS_SPIKE:
        sum_y = tl.zeros([BLOCK_N], dtype=tl.int64)
        sum_yy = tl.zeros([BLOCK_N], dtype=tl.int64)
    else:
        sum_y = tl.zeros([BLOCK_N], dtype=tl.float32)
        sum_yy = tl.zeros([BLOCK_N], dtype=tl.float32)
    v = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if DIRECT:
        y = linear_tile(x_ptr, tern_ptr, 0, offs_m, offs_n, N, K, C, IS_SPIKE, DOT_FP16, BLOCK_M, BLOCK_N, BLOCK_K)
        sum_y, sum_yy = linear_y_epilogue(y, 0, offs_m, offs_n, N, C, y_ptr, sum_y, sum_yy, IS_SPIKE, STORE_Y,
                                          STATS)
        if FIRE:
            for t in range(T):
                v = linear_fire_tile(y, v, t, offs_m, offs_n, N, C, alpha, a, b, res_ptr, out_ptr,
                                     decay, threshold, v_reset, HAS_RES, HARD_RESET, DECAY_INPUT)
    else:
        for t in range(T):
            y = linear_tile(x_ptr, tern_ptr, t, offs_m, offs_n, N, K, C, IS_SPIKE, DOT_FP16,
                            BLOCK_M, BLOCK_N, BLOCK_K)
            sum_y, sum_yy = linear_y_epilogue(y, t, offs_m, offs_n, N, C, y_ptr, sum_y, sum_yy, IS_SPIKE, STORE_Y,
                                              STATS)
            if FIRE:
                v = linear_fire_tile(y, v, t, offs_m, offs_n, N, C, alpha, a, b, res_ptr, out_ptr,
                                     decay, threshold, v_reset, HAS_RES, HARD_RESET, DECAY_INPUT)
    if PACK:
        if pid_n == 0:
            pack_bits_rows(x_ptr, bits_ptr, T * N, K, pid_m, tl.num_programs(0), 32)
    if STATS:
        # stats layout [2, grid_m, C]: partials per program row, summed on the host (deterministic).
        base = pid_m.to(tl.int64) * C + offs_n
        tl.store(stats_ptr + base, sum_y, mask=n_mask)
        tl.store(stats_ptr + tl.num_programs(0).to(tl.int64) * C + base, sum_yy, mask=n_mask)


@optional_tensors(HAS_RES="res_ptr")
@triton.jit
def linear_lif_scan_kernel(y_ptr, alpha_ptr, a_ptr, b_ptr, res_ptr, out_ptr, T, N, C,
                           decay, threshold, v_reset,
                           DIRECT: tl.constexpr, HAS_RES: tl.constexpr,
                           HARD_RESET: tl.constexpr, DECAY_INPUT: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # BatchNorm pass 2: LIF over the stored y [T_y, N, C] with the folded per-channel a, b.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < N)[:, None] & (offs_n < C)[None, :]
    alpha = tl.load(alpha_ptr)
    a = tl.load(a_ptr + offs_n, mask=offs_n < C, other=0.0)
    b = tl.load(b_ptr + offs_n, mask=offs_n < C, other=0.0)
    v = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    y_off = offs_m.to(tl.int64)[:, None] * C + offs_n[None, :]
    if DIRECT:
        y = tl.load(y_ptr + y_off, mask=mask, other=0)
    for t in range(T):
        if not DIRECT:
            y = tl.load(y_ptr + t * N * C + y_off, mask=mask, other=0)
        v = linear_fire_tile(y, v, t, offs_m, offs_n, N, C, alpha, a, b, res_ptr, out_ptr,
                             decay, threshold, v_reset, HAS_RES, HARD_RESET, DECAY_INPUT)


@triton.jit
def linear_scan_y(y_ptr, x_ptr, tern_ptr, t, y_off, mask, offs_m, offs_n, N, K, C, RECOMPUTE: tl.constexpr,
                  IS_SPIKE: tl.constexpr, DOT_FP16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """The pre-activation tile ``y[t]`` as fp32: loaded from the saved ``y``, or with RECOMPUTE rebuilt by the
    forward's GEMM (``linear_tile``: exact integers for spikes, the forward's tiles and rounding for analog x)."""
    if RECOMPUTE:
        y = linear_tile(x_ptr, tern_ptr, t, offs_m, offs_n, N, K, C, IS_SPIKE, DOT_FP16, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        y = tl.load(y_ptr + t * N * C + y_off, mask=mask, other=0)
    return y.to(tl.float32)


@optional_tensors(HAS_RES="res_ptr", GRAD_RES="grad_res_ptr", RECOMPUTE=("x_ptr", "tern_ptr"))
@triton.jit
def linear_lif_bwd_scan_kernel(y_ptr, x_ptr, tern_ptr, alpha_ptr, a_ptr, b_ptr, mult_ptr, res_ptr, grad_spike_ptr,
                               g_ptr, grad_res_ptr, part_ptr, T, N, K, C, decay, threshold, v_reset, sg_alpha,
                               DIRECT: tl.constexpr, HAS_RES: tl.constexpr, GRAD_RES: tl.constexpr,
                               RECOMPUTE: tl.constexpr, GY: tl.constexpr,
                               HARD_RESET: tl.constexpr, DECAY_INPUT: tl.constexpr, DETACH_RESET: tl.constexpr,
                               SURROGATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               IS_SPIKE: tl.constexpr = True, DOT_FP16: tl.constexpr = False,
                               BLOCK_K: tl.constexpr = 32):
    # g [T, N, C] fp32: holds U[t] after the recompute, then mult * dL/dI[t] (direct: slot 0 = sum over t).
    # part [2, grid_m, C]: per-program sums of dL/dI and, when GY, dL/dI * y (over rows and t; zeros without GY:
    # only the scale gradient and BatchNorm read them). RECOMPUTE (memory="recompute", no BatchNorm): x and tern
    # passed, y None; every y[t] is rebuilt from the forward's input x (``[T_y, N, K]``: spikes as the bits the
    # forward kernel saved, analog as it read it) and the int8 ternary weight ``[C, K]`` by the forward's GEMM,
    # once per step in the forward sweep and, with GY, again in the reverse sweep (a direct input's y once), so y
    # never reaches memory. Without RECOMPUTE, K, IS_SPIKE, DOT_FP16 and BLOCK_K are unused.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < C
    mask = (offs_m < N)[:, None] & n_mask[None, :]
    alpha = tl.load(alpha_ptr)
    a = tl.load(a_ptr + offs_n, mask=n_mask, other=0.0)
    b = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0)
    mult = tl.load(mult_ptr + offs_n, mask=n_mask, other=0.0)
    y_off = offs_m.to(tl.int64)[:, None] * C + offs_n[None, :]
    frame = N * C
    if DIRECT:
        y = linear_scan_y(y_ptr, x_ptr, tern_ptr, 0, y_off, mask, offs_m, offs_n, N, K, C, RECOMPUTE, IS_SPIKE,
                          DOT_FP16, BLOCK_M, BLOCK_N, BLOCK_K)
    v = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for t in range(T):
        if not DIRECT:
            y = linear_scan_y(y_ptr, x_ptr, tern_ptr, t, y_off, mask, offs_m, offs_n, N, K, C, RECOMPUTE, IS_SPIKE,
                              DOT_FP16, BLOCK_M, BLOCK_N, BLOCK_K)
        cur = (y * alpha) * a[None, :] + b[None, :]
        if HAS_RES:
            cur += tl.load(res_ptr + t * frame + y_off, mask=mask, other=0.0).to(tl.float32)
        u, spike, v = lif_step(v, cur, decay, threshold, v_reset, HARD_RESET, DECAY_INPUT)
        tl.store(g_ptr + t * frame + y_off, u, mask=mask)
    tl.debug_barrier()
    grad_v = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    g_sum = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    sum_g = tl.zeros([BLOCK_N], dtype=tl.float32)
    sum_gy = tl.zeros([BLOCK_N], dtype=tl.float32)
    for i in range(T):
        t = T - 1 - i
        u = tl.load(g_ptr + t * frame + y_off, mask=mask, other=0.0)
        spike = (u >= threshold).to(tl.float32)
        grad_spike = tl.load(grad_spike_ptr + t * frame + y_off, mask=mask, other=0.0).to(tl.float32)
        grad_cur, grad_v = lif_grad_step(grad_spike, grad_v, u, spike, decay, threshold, v_reset, sg_alpha,
                                         HARD_RESET, DECAY_INPUT, DETACH_RESET, SURROGATE)
        grad_cur = tl.where(mask, grad_cur, 0.0)
        if GRAD_RES:
            tl.store(grad_res_ptr + t * frame + y_off, grad_cur.to(grad_res_ptr.dtype.element_ty), mask=mask)
        if DIRECT:
            g_sum += grad_cur
        else:
            tl.store(g_ptr + t * frame + y_off, grad_cur * mult[None, :], mask=mask)
            sum_g += tl.sum(grad_cur, axis=0)
            if GY:
                y = linear_scan_y(y_ptr, x_ptr, tern_ptr, t, y_off, mask, offs_m, offs_n, N, K, C, RECOMPUTE,
                                  IS_SPIKE, DOT_FP16, BLOCK_M, BLOCK_N, BLOCK_K)
                sum_gy += tl.sum(grad_cur * y, axis=0)
    if DIRECT:
        tl.store(g_ptr + y_off, g_sum * mult[None, :], mask=mask)
        sum_g = tl.sum(g_sum, axis=0)
        if GY:
            sum_gy = tl.sum(g_sum * y, axis=0)
    base = pid_m.to(tl.int64) * C + offs_n
    tl.store(part_ptr + base, sum_g, mask=n_mask)
    tl.store(part_ptr + tl.num_programs(0).to(tl.int64) * C + base, sum_gy, mask=n_mask)


@triton.jit
def linear_grad_input_kernel(g_ptr, tern_ptr, alpha_ptr, dx_ptr, R, C, K,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             SPLIT: tl.constexpr = True):
    # dx [R, K] = alpha * g [R, C] @ tern [C, K]. Grid: (cdiv(R, BLOCK_M), cdiv(K, BLOCK_N)).
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < R
    n_mask = offs_n < K
    rows = offs_m.to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_K):
        offs_c = c0 + tl.arange(0, BLOCK_K)
        c_mask = offs_c < C
        gt = tl.load(g_ptr + rows[:, None] * C + offs_c[None, :], mask=m_mask[:, None] & c_mask[None, :], other=0.0)
        wt = tl.load(tern_ptr + offs_c.to(tl.int64)[:, None] * K + offs_n[None, :],
                     mask=c_mask[:, None] & n_mask[None, :], other=0)
        acc = split_dot_exact_b(gt, wt, acc, SPLIT)
    alpha = tl.load(alpha_ptr)
    tl.store(dx_ptr + rows[:, None] * K + offs_n[None, :], (acc * alpha).to(dx_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@optional_tensors(GRAD_SCORES=("gs_ptr", "weight_ptr", "scores_ptr"), GRAD_WEIGHT="gw_ptr")
@triton.jit
def linear_grad_weight_kernel(x_ptr, g_ptr, weight_ptr, scores_ptr, tern_ptr, alpha_ptr, gs_ptr, gw_ptr, R, C, K,
                              X_BITS: tl.constexpr, GRAD_SCORES: tl.constexpr, GRAD_WEIGHT: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              SPLIT: tl.constexpr = True):
    # dW_eff [C, K] = g[R, C]^T @ x[R, K]; epilogue: scores grad dW_eff * w * sign(s) (MPT straight-through),
    # weight grad dW_eff * alpha * M. X_BITS: x is the [R, K] spikes as bits (kernels/spike_bits.py layout).
    # Grid: (cdiv(C, BLOCK_M), cdiv(K, BLOCK_N)).
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < C
    n_mask = offs_n < K
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_K):
        offs_r = r0 + tl.arange(0, BLOCK_K)
        r_mask = offs_r < R
        rows = offs_r.to(tl.int64)
        gt = tl.load(g_ptr + rows[None, :] * C + offs_m[:, None], mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        x_mask = r_mask[:, None] & n_mask[None, :]
        flat = rows[:, None] * K + offs_n[None, :]
        if X_BITS:
            xt = load_bits(x_ptr, rows[:, None], offs_n[None, :], K, x_mask).to(tl.float32)
        else:
            xt = tl.load(x_ptr + flat, mask=x_mask, other=0.0).to(tl.float32)
        if X_BITS:
            acc = split_dot_exact_b(gt, xt, acc, SPLIT)  # 0/1 spikes: exact in bf16
        else:
            acc = split_dot_both(gt, xt, acc, SPLIT)
    off = offs_m.to(tl.int64)[:, None] * K + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if GRAD_SCORES:
        w = tl.load(weight_ptr + off, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(scores_ptr + off, mask=mask, other=0.0).to(tl.float32)
        sign_s = (s > 0).to(tl.float32) - (s < 0).to(tl.float32)
        tl.store(gs_ptr + off, (acc * w * sign_s).to(gs_ptr.dtype.element_ty), mask=mask)
    if GRAD_WEIGHT:
        tern = tl.load(tern_ptr + off, mask=mask, other=0)
        alpha = tl.load(alpha_ptr)
        tl.store(gw_ptr + off, (acc * tl.where(tern != 0, alpha, 0.0)).to(gw_ptr.dtype.element_ty), mask=mask)
