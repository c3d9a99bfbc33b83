"""Fused binary-weight linear + LIF for backend="triton": kernels, launchers, autograd Function, backend entry.

Shapes: x is ``[T, N, K]`` (spikes 0/1 or analog features) or a direct-encoded ``[N, K]`` with ``timesteps=T``;
the subnet weight ``[C, K]`` is ternary int8 (values -1/0/+1) times a scalar alpha; output spikes ``[T, N, C]``.
Row-major ``[.., K]`` inputs and ``[C, K]`` weights are already K-contiguous, so every GEMM tile load is
coalesced without a layout change; outputs ``[T, N, C]`` are C-contiguous, so spike tiles store coalesced.

Forward. Spike inputs are cast once to int8 and multiplied with int8 ternary weights by ``tl.dot`` into int32
(exact). Analog inputs use an fp16 dot (fp16 x; ternary weights are exact in fp16) or an fp32 dot with
input_precision="tf32x3" (x split in two tf32 halves; the ternary factor is exact in tf32, so this is fp32
accurate at tensor-core speed). Each program owns a [BLOCK_M rows x BLOCK_N channels] tile for all T steps:
per step it runs the K loop, forms I = (alpha*y)*a + b (+ residual[t]) and advances the membrane in registers
(``lif_step``); the float current never reaches memory. A direct-encoded input runs the K loop once.
Training-mode BatchNorm: pass 1 (the same kernel, FIRE=False) stores y and per-program partial sums of y, y^2
(int64 for spikes: exact); the host folds mean/rstd and gamma/beta into per-channel a, b; pass 2 is the
elementwise LIF scan over y.

Saved for backward: input spikes as packed bits (1 bit per spike, read bit-wise by the grad-weight kernel; an
analog input is kept as is), y as int16 (int32 when K > 32767; fp32 for analog inputs), the ternary
weight as 2 bits per weight (binwslt.bits.pack_ternary), alpha and the per-channel a, b. The membrane is recomputed from y rather than stored.

Backward: one scan kernel recomputes U over T (parked in the gradient buffer), runs the reverse BPTT scan
(``lif_grad_step``), writes dL/dI times the per-channel multiplier (scale without BN; 1 with BN, folded after),
the residual gradient and per-program partial sums of dL/dI and dL/dI*y per channel. With BN an elementwise
fold applies the batch-statistics gradient. Then the grad-input GEMM (dI @ alpha*tern) and the grad-weight GEMM
(dI^T @ x) whose epilogue applies the straight-through rule (x w x sign(s)) for the scores.
"""
from __future__ import annotations

import itertools
import os

import torch
import triton
import triton.language as tl

from binwslt._affine import update_running_stats
from binwslt.bits import pack_bits, pack_ternary, unpack_ternary
from binwslt.config import LIFConfig

from .lif import SURROGATE_CODES, check_spike_counts, lif_grad_step, lif_step, neuron_params

_INT32_LIMIT = 2 ** 31 - 1


# ================================================================================================= kernels
@triton.jit
def linear_tile(x_ptr, tern_ptr, frame, offs_m, offs_n, N, K, C, IS_SPIKE: tl.constexpr, DOT_FP16: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y tile [BLOCK_M, BLOCK_N] = x[frame, offs_m, :] @ tern[offs_n, :]^T (int32 for spikes, else fp32)."""
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
        xt = tl.load(x_ptr + rows[:, None] * K + offs_k[None, :], mask=row_mask[:, None] & k_mask[None, :],
                     other=0)
        wt = tl.load(tern_ptr + offs_n.to(tl.int64)[None, :] * K + offs_k[:, None],
                     mask=k_mask[:, None] & col_mask[None, :], other=0)
        if IS_SPIKE:
            acc = tl.dot(xt, wt, acc, out_dtype=tl.int32)
        elif DOT_FP16:
            acc = tl.dot(xt, wt.to(tl.float16), acc)
        else:
            acc = tl.dot(xt.to(tl.float32), wt.to(tl.float32), acc, input_precision="tf32x3")
    return acc


@triton.jit
def linear_fire_tile(y, v, t, offs_m, offs_n, N, C, alpha, a, b, res_ptr, out_ptr, count,
                     decay, threshold, v_reset, HAS_RES: tl.constexpr, COUNT: tl.constexpr,
                     HARD_RESET: tl.constexpr, DECAY_INPUT: tl.constexpr):
    """Current (alpha*y)*a + b (+ residual[t]) -> one LIF step; stores spikes[t]; returns (v, count)."""
    mask = (offs_m < N)[:, None] & (offs_n < C)[None, :]
    off = (t * N + offs_m.to(tl.int64))[:, None] * C + offs_n[None, :]
    cur = (y.to(tl.float32) * alpha) * a[None, :] + b[None, :]
    if HAS_RES:
        cur += tl.load(res_ptr + off, mask=mask, other=0.0).to(tl.float32)
    u, spike, v = lif_step(v, cur, decay, threshold, v_reset, HARD_RESET, DECAY_INPUT)
    tl.store(out_ptr + off, spike.to(out_ptr.dtype.element_ty), mask=mask)
    if COUNT:
        count += tl.sum(tl.where(mask, spike, 0.0).to(tl.int32), axis=0)
    return v, count


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


@triton.jit
def binary_linear_lif_fwd_kernel(
        x_ptr, tern_ptr, alpha_ptr, a_ptr, b_ptr, res_ptr, out_ptr, y_ptr, count_ptr, stats_ptr,
        T, N, K, C, decay, threshold, v_reset,
        IS_SPIKE: tl.constexpr, DOT_FP16: tl.constexpr, DIRECT: tl.constexpr, FIRE: tl.constexpr,
        HAS_RES: tl.constexpr, STORE_Y: tl.constexpr, COUNT: tl.constexpr, STATS: tl.constexpr,
        HARD_RESET: tl.constexpr, DECAY_INPUT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Grid: (cdiv(N, BLOCK_M), cdiv(C, BLOCK_N)); every program runs all T steps of its tile.
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
    count = tl.zeros([BLOCK_N], dtype=tl.int32)
    if DIRECT:
        y = linear_tile(x_ptr, tern_ptr, 0, offs_m, offs_n, N, K, C, IS_SPIKE, DOT_FP16, BLOCK_M, BLOCK_N, BLOCK_K)
        sum_y, sum_yy = linear_y_epilogue(y, 0, offs_m, offs_n, N, C, y_ptr, sum_y, sum_yy, IS_SPIKE, STORE_Y,
                                          STATS)
        if FIRE:
            for t in range(T):
                v, count = linear_fire_tile(y, v, t, offs_m, offs_n, N, C, alpha, a, b, res_ptr, out_ptr, count,
                                            decay, threshold, v_reset, HAS_RES, COUNT, HARD_RESET, DECAY_INPUT)
    else:
        for t in range(T):
            y = linear_tile(x_ptr, tern_ptr, t, offs_m, offs_n, N, K, C, IS_SPIKE, DOT_FP16,
                            BLOCK_M, BLOCK_N, BLOCK_K)
            sum_y, sum_yy = linear_y_epilogue(y, t, offs_m, offs_n, N, C, y_ptr, sum_y, sum_yy, IS_SPIKE, STORE_Y,
                                              STATS)
            if FIRE:
                v, count = linear_fire_tile(y, v, t, offs_m, offs_n, N, C, alpha, a, b, res_ptr, out_ptr, count,
                                            decay, threshold, v_reset, HAS_RES, COUNT, HARD_RESET, DECAY_INPUT)
    if STATS:
        # stats layout [2, grid_m, C]: partials per program row, summed on the host (deterministic).
        base = pid_m.to(tl.int64) * C + offs_n
        tl.store(stats_ptr + base, sum_y, mask=n_mask)
        tl.store(stats_ptr + tl.num_programs(0).to(tl.int64) * C + base, sum_yy, mask=n_mask)
    if COUNT:
        tl.atomic_add(count_ptr + offs_n, count, mask=n_mask)


@triton.jit
def linear_lif_scan_kernel(y_ptr, alpha_ptr, a_ptr, b_ptr, res_ptr, out_ptr, count_ptr, T, N, C,
                           decay, threshold, v_reset,
                           DIRECT: tl.constexpr, HAS_RES: tl.constexpr, COUNT: tl.constexpr,
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
    count = tl.zeros([BLOCK_N], dtype=tl.int32)
    y_off = offs_m.to(tl.int64)[:, None] * C + offs_n[None, :]
    if DIRECT:
        y = tl.load(y_ptr + y_off, mask=mask, other=0)
    for t in range(T):
        if not DIRECT:
            y = tl.load(y_ptr + t * N * C + y_off, mask=mask, other=0)
        v, count = linear_fire_tile(y, v, t, offs_m, offs_n, N, C, alpha, a, b, res_ptr, out_ptr, count,
                                    decay, threshold, v_reset, HAS_RES, COUNT, HARD_RESET, DECAY_INPUT)
    if COUNT:
        tl.atomic_add(count_ptr + offs_n, count, mask=offs_n < C)


@triton.jit
def linear_lif_bwd_scan_kernel(y_ptr, alpha_ptr, a_ptr, b_ptr, mult_ptr, res_ptr, grad_spike_ptr, g_ptr,
                               grad_res_ptr, part_ptr, T, N, C, decay, threshold, v_reset, sg_alpha,
                               DIRECT: tl.constexpr, HAS_RES: tl.constexpr, GRAD_RES: tl.constexpr,
                               HARD_RESET: tl.constexpr, DECAY_INPUT: tl.constexpr, DETACH_RESET: tl.constexpr,
                               SURROGATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # g [T, N, C] fp32: holds U[t] after the recompute, then mult * dL/dI[t] (direct: slot 0 = sum over t).
    # part [2, grid_m, C]: per-program sums of dL/dI and dL/dI * y (over rows and t).
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
        y = tl.load(y_ptr + y_off, mask=mask, other=0).to(tl.float32)
    v = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for t in range(T):
        if not DIRECT:
            y = tl.load(y_ptr + t * frame + y_off, mask=mask, other=0).to(tl.float32)
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
        if not DIRECT:
            y = tl.load(y_ptr + t * frame + y_off, mask=mask, other=0).to(tl.float32)
        if GRAD_RES:
            tl.store(grad_res_ptr + t * frame + y_off, grad_cur.to(grad_res_ptr.dtype.element_ty), mask=mask)
        if DIRECT:
            g_sum += grad_cur
        else:
            tl.store(g_ptr + t * frame + y_off, grad_cur * mult[None, :], mask=mask)
            sum_g += tl.sum(grad_cur, axis=0)
            sum_gy += tl.sum(grad_cur * y, axis=0)
    if DIRECT:
        tl.store(g_ptr + y_off, g_sum * mult[None, :], mask=mask)
        sum_g = tl.sum(g_sum, axis=0)
        sum_gy = tl.sum(g_sum * y, axis=0)
    base = pid_m.to(tl.int64) * C + offs_n
    tl.store(part_ptr + base, sum_g, mask=n_mask)
    tl.store(part_ptr + tl.num_programs(0).to(tl.int64) * C + base, sum_gy, mask=n_mask)


@triton.jit
def linear_bn_grad_fold_kernel(g_ptr, y_ptr, c1_ptr, c2_ptr, c3_ptr, numel, C, BLOCK: tl.constexpr):
    # BatchNorm backward through the batch statistics, per channel c: g <- c1*g + c2*y + c3 (in place).
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    c = offs % C
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    y = tl.load(y_ptr + offs, mask=mask, other=0).to(tl.float32)
    c1 = tl.load(c1_ptr + c, mask=mask, other=0.0)
    c2 = tl.load(c2_ptr + c, mask=mask, other=0.0)
    c3 = tl.load(c3_ptr + c, mask=mask, other=0.0)
    tl.store(g_ptr + offs, c1 * g + c2 * y + c3, mask=mask)


@triton.jit
def linear_grad_input_kernel(g_ptr, tern_ptr, alpha_ptr, dx_ptr, R, C, K,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
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
        acc = tl.dot(gt, wt.to(tl.float32), acc, input_precision="tf32x3")
    alpha = tl.load(alpha_ptr)
    tl.store(dx_ptr + rows[:, None] * K + offs_n[None, :], (acc * alpha).to(dx_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def linear_grad_weight_kernel(x_ptr, g_ptr, weight_ptr, scores_ptr, tern_ptr, alpha_ptr, gs_ptr, gw_ptr, R, C, K,
                              X_BITS: tl.constexpr, GRAD_SCORES: tl.constexpr, GRAD_WEIGHT: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # dW_eff [C, K] = g[R, C]^T @ x[R, K]; epilogue: scores grad dW_eff * w * sign(s) (MPT straight-through),
    # weight grad dW_eff * alpha * M. X_BITS: x is packed bits (little-endian, 8 per byte) of the [R, K] spikes.
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
            byte = tl.load(x_ptr + (flat >> 3), mask=x_mask, other=0)
            xt = ((byte.to(tl.int32) >> (flat & 7).to(tl.int32)) & 1).to(tl.float32)
        else:
            xt = tl.load(x_ptr + flat, mask=x_mask, other=0.0).to(tl.float32)
        acc = tl.dot(gt, xt, acc, input_precision="tf32x3")
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


# ================================================================================================= configs
def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# GPU tiles respect tl.dot minimums (M, N >= 16; K >= 32 for int8, >= 16 otherwise); the interpreter (one config,
# tiny tiles) keeps test grids small. Every GPU config below is listed in COMPILE_SPECS.
# Keyed by input kind. fp16 analog at 4 warps spills on sm_90; fp32 (tf32x3) spills with BLOCK_K=64.
_FWD_GPU = {"spike": dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
            "fp16": dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3),
            "fp32": dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)}
_FWD_INTERP = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, num_warps=4, num_stages=1)
_SCAN_GPU = dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=1)  # 4 warps: the backward scan spills
_SCAN_INTERP = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
_GEMM_GPU = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)
_GEMM_INTERP = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1)
FOLD_BLOCK = 1024


def forward_config(is_spike, dot_fp16):
    """Tile config of binary_linear_lif_fwd_kernel: dict of BLOCK_M/N/K, num_warps, num_stages."""
    if _interpreting():
        return dict(_FWD_INTERP)
    return dict(_FWD_GPU["spike" if is_spike else ("fp16" if dot_fp16 else "fp32")])


def scan_config():
    """Tile config of the elementwise scan kernels (forward pass 2 and backward scan)."""
    return dict(_SCAN_INTERP) if _interpreting() else dict(_SCAN_GPU)


def gemm_config():
    """Tile config of the backward GEMMs (grad input, grad weight)."""
    return dict(_GEMM_INTERP) if _interpreting() else dict(_GEMM_GPU)


def _launch_opts(cfg):
    return {k: cfg[k] for k in cfg}


# ================================================================================================= launchers
def _is_spike_tensor(x):
    return bool(((x == 0) | (x == 1)).all())


def _subnet(weight, scores, prune_rate):
    from .subnet import ternary_subnet

    tern, alpha = ternary_subnet(weight, scores, prune_rate)
    return tern.contiguous(), alpha.reshape(1).to(torch.float32)


def _check_int32(**sizes):
    for name, numel in sizes.items():
        if numel > _INT32_LIMIT:
            raise ValueError(f"{name} has {numel} elements; the Triton linear kernels index rows with int32 "
                             f"offsets up to {_INT32_LIMIT}")


def _channel_vec(v, channels, fill, device):
    if v is None:
        return torch.full((channels,), fill, dtype=torch.float32, device=device)
    return v.detach().to(torch.float32).contiguous()


def _prepare_input(x, direct):
    """Kernel input [T_y, N, K] (contiguous), is_spike, dot_fp16."""
    frames = x.unsqueeze(0) if direct else x
    is_spike = (not direct) and _is_spike_tensor(frames)
    if is_spike:
        return frames.detach().to(torch.int8).contiguous(), True, False
    if frames.dtype == torch.float16:
        return frames.detach().contiguous(), False, True
    return frames.detach().to(torch.float32).contiguous(), False, False


def _y_dtype(is_spike, K):
    if not is_spike:
        return torch.float32
    return torch.int16 if K <= 32767 else torch.int32


def linear_lif_forward(x, weight, scores, prune_rate, *, scale, shift, residual, neuron, timesteps, batch_norm,
                       running_mean, running_var, momentum, eps, need_state=False, spike_counts=None):
    """Fused forward. Returns ``(spikes [T, N, C] in x.dtype, state)``; state (dict) only when ``need_state``.

    ``spike_counts``: optional integer ``[C]`` tensor that this call's per-channel spike counts are added to.
    """
    direct = timesteps is not None
    T = int(timesteps) if direct else x.shape[0]
    N, K = x.shape[-2], x.shape[-1]
    C = weight.shape[0]
    device = x.device
    p = neuron_params(neuron)
    tern, alpha = _subnet(weight, scores, prune_rate)
    x_k, is_spike, dot_fp16 = _prepare_input(x, direct)
    T_y = x_k.shape[0]
    _check_int32(x=x_k.numel(), output=T * N * C, weight=C * K)
    out = torch.empty((T, N, C), dtype=x.dtype, device=device)
    res = residual.detach().contiguous() if residual is not None else None
    count = torch.zeros(C, dtype=torch.int32, device=device) if spike_counts is not None else None
    store_y = need_state or batch_norm
    y = torch.empty((T_y, N, C), dtype=_y_dtype(is_spike, K), device=device) if store_y else None
    dummy_i32 = torch.empty(1, dtype=torch.int32, device=device)
    dummy_f32 = torch.empty(1, dtype=torch.float32, device=device)
    cfg = forward_config(is_spike, dot_fp16)
    grid = (triton.cdiv(N, cfg["BLOCK_M"]), triton.cdiv(C, cfg["BLOCK_N"]))
    flags = dict(IS_SPIKE=is_spike, DOT_FP16=dot_fp16, DIRECT=direct, HARD_RESET=p["HARD_RESET"],
                 DECAY_INPUT=p["DECAY_INPUT"], **_launch_opts(cfg))
    bn_state = None
    if not batch_norm:
        a = _channel_vec(scale, C, 1.0, device)
        b = _channel_vec(shift, C, 0.0, device)
        binary_linear_lif_fwd_kernel[grid](
            x_k, tern, alpha, a, b, res if res is not None else dummy_f32, out,
            y if y is not None else dummy_i32, count if count is not None else dummy_i32, dummy_i32,
            T, N, K, C, p["decay"], p["threshold"], p["v_reset"],
            FIRE=True, HAS_RES=res is not None, STORE_Y=store_y, COUNT=count is not None, STATS=False, **flags)
    else:
        stats = torch.empty((2, grid[0], C), dtype=torch.int64 if is_spike else torch.float32, device=device)
        binary_linear_lif_fwd_kernel[grid](
            x_k, tern, alpha, dummy_f32, dummy_f32, dummy_f32, out, y, dummy_i32, stats,
            T, N, K, C, p["decay"], p["threshold"], p["v_reset"],
            FIRE=False, HAS_RES=False, STORE_Y=True, COUNT=False, STATS=True, **flags)
        # Batch statistics of alpha*y over (T, N) (for direct input the T copies share one frame), in float64.
        sums = stats.sum(dim=1).to(torch.float64)
        frames = T_y * N
        mean_y = sums[0] / frames
        var_y = (sums[1] / frames - mean_y * mean_y).clamp_min(0.0)
        alpha64 = alpha.to(torch.float64)
        mean = (alpha64 * mean_y).to(torch.float32)
        var = (alpha64 * alpha64 * var_y).to(torch.float32)
        update_running_stats(running_mean, running_var, mean, var, T * N, momentum)
        rstd = torch.rsqrt(var + eps)
        a = rstd if scale is None else rstd * scale.detach().to(torch.float32)
        b = -mean * a if shift is None else shift.detach().to(torch.float32) - mean * a
        a, b = a.contiguous(), b.contiguous()
        bn_state = (mean, rstd)
        scfg = scan_config()
        sgrid = (triton.cdiv(N, scfg["BLOCK_M"]), triton.cdiv(C, scfg["BLOCK_N"]))
        linear_lif_scan_kernel[sgrid](
            y, alpha, a, b, res if res is not None else dummy_f32, out, count if count is not None else dummy_i32,
            T, N, C, p["decay"], p["threshold"], p["v_reset"],
            DIRECT=direct, HAS_RES=res is not None, COUNT=count is not None, HARD_RESET=p["HARD_RESET"],
            DECAY_INPUT=p["DECAY_INPUT"], **_launch_opts(scfg))
    if spike_counts is not None:
        with torch.no_grad():
            spike_counts.add_(count.to(spike_counts.dtype))
    state = None
    if need_state:
        saved_x = pack_bits(x_k != 0) if is_spike else x_k
        state = dict(saved_x=saved_x, y=y, tern=tern, alpha=alpha, a=a, b=b, bn=bn_state, is_spike=is_spike,
                     direct=direct, T=T, N=N, K=K, C=C, neuron=neuron, x_dtype=x.dtype)
    return out, state


def linear_lif_backward(state, grad_spikes, weight, scores, scale, residual, needs):
    """Gradients ``(grad_x, grad_weight, grad_scores, grad_scale, grad_shift, grad_residual)``, None where
    ``needs`` (6 bools) is False. ``grad_spikes``: dL/dspikes ``[T, N, C]``."""
    need_x, need_w, need_s, need_scale, need_shift, need_res = needs
    T, N, K, C, direct = state["T"], state["N"], state["K"], state["C"], state["direct"]
    device = grad_spikes.device
    p = neuron_params(state["neuron"])
    y, alpha, a, b, bn = state["y"], state["alpha"], state["a"], state["b"], state["bn"]
    grad_spikes = grad_spikes.contiguous()
    dummy_f32 = torch.empty(1, dtype=torch.float32, device=device)
    if bn is None and scale is not None:
        mult = scale.detach().to(torch.float32).contiguous()
    else:
        mult = torch.ones(C, dtype=torch.float32, device=device)
    g = torch.empty((T, N, C), dtype=torch.float32, device=device)
    grad_res = torch.empty((T, N, C), dtype=residual.dtype, device=device) \
        if (need_res and residual is not None) else None
    res = residual.detach().contiguous() if residual is not None else None
    scfg = scan_config()
    grid = (triton.cdiv(N, scfg["BLOCK_M"]), triton.cdiv(C, scfg["BLOCK_N"]))
    part = torch.empty((2, grid[0], C), dtype=torch.float32, device=device)
    linear_lif_bwd_scan_kernel[grid](
        y, alpha, a, b, mult, res if res is not None else dummy_f32, grad_spikes, g,
        grad_res if grad_res is not None else dummy_f32, part, T, N, C,
        p["decay"], p["threshold"], p["v_reset"], p["alpha"],
        DIRECT=direct, HAS_RES=res is not None, GRAD_RES=grad_res is not None, HARD_RESET=p["HARD_RESET"],
        DECAY_INPUT=p["DECAY_INPUT"], DETACH_RESET=p["DETACH_RESET"], SURROGATE=p["SURROGATE"],
        **_launch_opts(scfg))
    sums = part.sum(dim=1)  # [2, C]: sum dL/dI, sum dL/dI * y
    sum_g, sum_gy = sums[0], sums[1]
    T_y = y.shape[0]
    g_frames = g[:T_y]
    grad_scale = grad_shift = None
    if bn is None:
        if need_scale:
            grad_scale = alpha * sum_gy
        if need_shift:
            grad_shift = sum_g.clone()
    else:
        mean, rstd = bn
        count = T_y * N
        dgamma = rstd * (alpha * sum_gy - mean * sum_g)  # sum dL/dI * xhat
        if need_scale:
            grad_scale = dgamma
        if need_shift:
            grad_shift = sum_g.clone()
        if need_x or need_w or need_s:
            gain = rstd if scale is None else rstd * scale.detach().to(torch.float32)
            c1 = gain.contiguous()
            c2 = (-gain * dgamma / count * alpha * rstd).contiguous()
            c3 = (-gain * sum_g / count + gain * dgamma / count * mean * rstd).contiguous()
            numel = g_frames.numel()
            linear_bn_grad_fold_kernel[(triton.cdiv(numel, FOLD_BLOCK),)](
                g_frames, y, c1, c2, c3, numel, C, BLOCK=FOLD_BLOCK, num_warps=4)
    gcfg = gemm_config()
    R = T_y * N
    grad_x = None
    if need_x:
        dx = torch.empty((R, K), dtype=state["x_dtype"], device=device)
        linear_grad_input_kernel[(triton.cdiv(R, gcfg["BLOCK_M"]), triton.cdiv(K, gcfg["BLOCK_N"]))](
            g_frames, state["tern"], alpha, dx, R, C, K, **_launch_opts(gcfg))
        grad_x = dx.view(N, K) if direct else dx.view(T, N, K)
    grad_w = grad_s = None
    if need_w or need_s:
        gs = torch.empty((C, K), dtype=scores.dtype, device=device) if need_s else None
        gw = torch.empty((C, K), dtype=weight.dtype, device=device) if need_w else None
        linear_grad_weight_kernel[(triton.cdiv(C, gcfg["BLOCK_M"]), triton.cdiv(K, gcfg["BLOCK_N"]))](
            state["saved_x"], g_frames, weight.detach().contiguous(), scores.detach().contiguous(), state["tern"],
            alpha, gs if gs is not None else dummy_f32, gw if gw is not None else dummy_f32, R, C, K,
            X_BITS=state["is_spike"], GRAD_SCORES=need_s, GRAD_WEIGHT=need_w, **_launch_opts(gcfg))
        grad_w, grad_s = gw, gs
    if scale is not None and grad_scale is not None:
        grad_scale = grad_scale.to(scale.dtype)
    return grad_x, grad_w, grad_s, grad_scale, grad_shift, grad_res


class BinWLinearLIFFunction(torch.autograd.Function):
    """Autograd wrapper of the fused linear + LIF; gradients to x, weight, scores, scale, shift, residual."""

    @staticmethod
    def forward(ctx, x, weight, scores, scale, shift, residual, running_mean, running_var, prune_rate, neuron,
                timesteps, batch_norm, momentum, eps, spike_counts):
        need_grad = any(ctx.needs_input_grad[:6])
        spikes, state = linear_lif_forward(
            x, weight, scores, prune_rate, scale=scale, shift=shift, residual=residual, neuron=neuron,
            timesteps=timesteps, batch_norm=batch_norm, running_mean=running_mean, running_var=running_var,
            momentum=momentum, eps=eps, need_state=need_grad, spike_counts=spike_counts)
        if need_grad:
            bn = state.pop("bn")
            tensors = [state.pop("saved_x"), state.pop("y"), *pack_ternary(state.pop("tern")), state.pop("alpha"),
                       state.pop("a"), state.pop("b"), weight, scores, scale, residual]
            tensors += list(bn) if bn is not None else [None, None]
            ctx.save_for_backward(*tensors)
            ctx.state = state
        return spikes

    @staticmethod
    def backward(ctx, grad_spikes):
        saved_x, y, mask_bits, sign_bits, alpha, a, b, weight, scores, scale, residual, mean, rstd = ctx.saved_tensors
        tern = unpack_ternary(mask_bits, sign_bits, weight.shape).contiguous()
        state = dict(ctx.state, saved_x=saved_x, y=y, tern=tern, alpha=alpha, a=a, b=b,
                     bn=None if mean is None else (mean, rstd))
        grads = linear_lif_backward(state, grad_spikes, weight, scores, scale, residual, ctx.needs_input_grad[:6])
        return grads + (None,) * 9


def binw_linear_lif(x, weight, scores, prune_rate, *, scale, shift, residual, neuron, timesteps, batch_norm,
                    running_mean, running_var, momentum, eps, spike_counts=None):
    """Fused binary-subnet linear + LIF (backend="triton"; arguments validated by `binwslt.functional`).

    x: ``[T, N, K]`` float (spikes 0/1 or analog) or an analog ``[N, K]`` with ``timesteps=T``; weight/scores
    ``[C, K]`` float; scale/shift ``[C]`` float or None; residual ``[T, N, C]`` or None; neuron a LIFConfig;
    batch_norm: training-mode BatchNorm over (T, N) per channel (running stats updated in place).
    ``spike_counts`` (extra, optional): integer ``[C]`` tensor the per-channel output spike counts are added to.
    Returns spikes ``[T, N, C]`` in x.dtype; differentiable to x, weight, scores, scale, shift, residual.
    """
    if not isinstance(neuron, LIFConfig):
        raise TypeError(f"neuron must be a LIFConfig, got {type(neuron).__name__}")
    check_spike_counts(spike_counts, weight.shape[0])
    if x.dtype == torch.float64:
        raise TypeError("the Triton linear kernels compute in fp32; use backend='torch' for float64 x")
    return BinWLinearLIFFunction.apply(x, weight, scores, scale, shift, residual, running_mean, running_var,
                                       prune_rate, neuron, timesteps, batch_norm, momentum, eps, spike_counts)


# ================================================================================================= compile specs
def _fwd_signature(x_type, out_type, y_type, stats_type):
    return {"x_ptr": x_type, "tern_ptr": "*i8", "alpha_ptr": "*fp32", "a_ptr": "*fp32", "b_ptr": "*fp32",
            "res_ptr": "*fp32", "out_ptr": out_type, "y_ptr": y_type, "count_ptr": "*i32", "stats_ptr": stats_type,
            "T": "i32", "N": "i32", "K": "i32", "C": "i32", "decay": "fp32", "threshold": "fp32", "v_reset": "fp32",
            **{k: "constexpr" for k in ("IS_SPIKE", "DOT_FP16", "DIRECT", "FIRE", "HAS_RES", "STORE_Y", "COUNT",
                                        "STATS", "HARD_RESET", "DECAY_INPUT", "BLOCK_M", "BLOCK_N", "BLOCK_K")}}


def _hints(signature, *ints):
    """divisible_by_16 for compile_report: every pointer (torch allocations are 16-byte aligned) plus ``ints``."""
    return [a for a, t in signature.items() if t.startswith("*")] + list(ints)


def _covering(data_options, neuron_options):
    """Data-path x neuron-flag combinations to compile: every data-path combination with the default neuron (the
    first neuron option), plus every neuron-flag combination with the heaviest data path (the last data option).
    The neuron flags only swap a few elementwise ops; the data path decides tiles, loads and register pressure."""
    data = list(itertools.product(*data_options))
    neurons = list(itertools.product(*neuron_options))
    combos = [(d, neurons[0]) for d in data] + [(data[-1], n) for n in neurons[1:]]
    return combos


def _compile_specs():
    specs = []
    # Forward. Inputs: (name, is_spike, direct, x pointer type, dot_fp16, spike output dtypes).
    inputs = [("spike", True, False, "*i8", False, ("fp32", "fp16", "bf16")),
              ("fp32", False, False, "*fp32", False, ("fp32", "bf16")),
              ("fp16", False, False, "*fp16", True, ("fp16",)),
              ("direct-fp32", False, True, "*fp32", False, ("fp32", "bf16")),
              ("direct-fp16", False, True, "*fp16", True, ("fp16",))]
    for name, is_spike, direct, x_type, dot_fp16, out_types in inputs:
        cfg = dict(_FWD_GPU["spike" if is_spike else ("fp16" if dot_fp16 else "fp32")])
        nw, ns = cfg.pop("num_warps"), cfg.pop("num_stages")
        y_type = "*i16" if is_spike else "*fp32"
        stats_type = "*i64" if is_spike else "*fp32"
        base = dict(IS_SPIKE=is_spike, DOT_FP16=dot_fp16, DIRECT=direct, **cfg)
        # BatchNorm pass 1: no firing; the neuron flags are unused.
        specs.append({"name": f"binary_linear_lif_fwd_kernel[{name},bn-stats]", "fn": binary_linear_lif_fwd_kernel,
                      "signature": _fwd_signature(x_type, "*" + out_types[0], y_type, stats_type),
                      "constexprs": dict(base, FIRE=False, HAS_RES=False, STORE_Y=True, COUNT=False, STATS=True,
                                         HARD_RESET=True, DECAY_INPUT=False),
                      "num_warps": nw, "num_stages": ns})
        for (out_t, store_y, has_res, count), (hard, decay_input) in _covering(
                (out_types, (False, True), (False, True), (False, True)), ((True, False), (False, True))):
            specs.append({
                "name": (f"binary_linear_lif_fwd_kernel[{name},out={out_t},store_y={store_y},res={has_res},"
                         f"count={count},hard={hard},decay_input={decay_input}]"),
                "fn": binary_linear_lif_fwd_kernel,
                "signature": _fwd_signature(x_type, "*" + out_t, y_type, stats_type),
                "constexprs": dict(base, FIRE=True, HAS_RES=has_res, STORE_Y=store_y, COUNT=count, STATS=False,
                                   HARD_RESET=hard, DECAY_INPUT=decay_input),
                "num_warps": nw, "num_stages": ns})
    scan = dict(_SCAN_GPU)
    snw, sns = scan.pop("num_warps"), scan.pop("num_stages")
    for (y_t, out_t, direct, has_res, count), (hard, decay_input) in _covering(
            (("fp32", "i16"), ("fp32", "fp16", "bf16"), (True, False), (False, True), (False, True)),
            ((True, False), (False, True))):
        if direct and y_t == "i16":
            continue
        specs.append({
            "name": (f"linear_lif_scan_kernel[y={y_t},out={out_t},direct={direct},res={has_res},count={count},"
                     f"hard={hard},decay_input={decay_input}]"),
            "fn": linear_lif_scan_kernel,
            "signature": {"y_ptr": f"*{y_t}", "alpha_ptr": "*fp32", "a_ptr": "*fp32", "b_ptr": "*fp32",
                          "res_ptr": "*fp32", "out_ptr": f"*{out_t}", "count_ptr": "*i32", "T": "i32", "N": "i32",
                          "C": "i32", "decay": "fp32", "threshold": "fp32", "v_reset": "fp32",
                          **{k: "constexpr" for k in ("DIRECT", "HAS_RES", "COUNT", "HARD_RESET", "DECAY_INPUT",
                                                      "BLOCK_M", "BLOCK_N")}},
            "constexprs": dict(DIRECT=direct, HAS_RES=has_res, COUNT=count, HARD_RESET=hard, DECAY_INPUT=decay_input,
                               **scan),
            "num_warps": snw, "num_stages": sns})
    for (y_t, direct, res_mode), (hard, decay_input, detach, surrogate) in _covering(
            (("fp32", "i16"), (True, False), ("none", "res", "res+grad")),
            ((True, False), (False, True), (False, True), tuple(SURROGATE_CODES))):
        if direct and y_t == "i16":
            continue
        specs.append({
            "name": (f"linear_lif_bwd_scan_kernel[y={y_t},direct={direct},{res_mode},hard={hard},"
                     f"decay_input={decay_input},detach={detach},{surrogate}]"),
            "fn": linear_lif_bwd_scan_kernel,
            "signature": {"y_ptr": f"*{y_t}", "alpha_ptr": "*fp32", "a_ptr": "*fp32", "b_ptr": "*fp32",
                          "mult_ptr": "*fp32", "res_ptr": "*fp32", "grad_spike_ptr": "*fp32", "g_ptr": "*fp32",
                          "grad_res_ptr": "*fp32", "part_ptr": "*fp32", "T": "i32", "N": "i32", "C": "i32",
                          "decay": "fp32", "threshold": "fp32", "v_reset": "fp32", "sg_alpha": "fp32",
                          **{k: "constexpr" for k in ("DIRECT", "HAS_RES", "GRAD_RES", "HARD_RESET", "DECAY_INPUT",
                                                      "DETACH_RESET", "SURROGATE", "BLOCK_M", "BLOCK_N")}},
            "constexprs": dict(DIRECT=direct, HAS_RES=res_mode != "none", GRAD_RES=res_mode == "res+grad",
                               HARD_RESET=hard, DECAY_INPUT=decay_input, DETACH_RESET=detach,
                               SURROGATE=SURROGATE_CODES[surrogate], **scan),
            "num_warps": snw, "num_stages": sns})
    for y_t in ("i16", "fp32"):
        specs.append({
            "name": f"linear_bn_grad_fold_kernel[y={y_t}]", "fn": linear_bn_grad_fold_kernel,
            "signature": {"g_ptr": "*fp32", "y_ptr": f"*{y_t}", "c1_ptr": "*fp32", "c2_ptr": "*fp32",
                          "c3_ptr": "*fp32", "numel": "i32", "C": "i32", "BLOCK": "constexpr"},
            "constexprs": {"BLOCK": FOLD_BLOCK}, "num_warps": 4, "num_stages": 1})
    gemm = dict(_GEMM_GPU)
    gnw, gns = gemm.pop("num_warps"), gemm.pop("num_stages")
    for dx_t in ("fp32", "fp16", "bf16"):
        specs.append({
            "name": f"linear_grad_input_kernel[dx={dx_t}]", "fn": linear_grad_input_kernel,
            "signature": {"g_ptr": "*fp32", "tern_ptr": "*i8", "alpha_ptr": "*fp32", "dx_ptr": f"*{dx_t}",
                          "R": "i32", "C": "i32", "K": "i32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
                          "BLOCK_K": "constexpr"},
            "constexprs": dict(gemm), "num_warps": gnw, "num_stages": gns})
    for x_t, w_t, gs, gw in itertools.product(("bits", "fp32", "fp16"), ("fp32", "fp16", "bf16"), (True, False),
                                              (True, False)):
        if not (gs or gw):
            continue
        specs.append({
            "name": f"linear_grad_weight_kernel[x={x_t},w={w_t},scores={gs},weight={gw}]",
            "fn": linear_grad_weight_kernel,
            "signature": {"x_ptr": "*u8" if x_t == "bits" else f"*{x_t}", "g_ptr": "*fp32", "weight_ptr": f"*{w_t}",
                          "scores_ptr": f"*{w_t}", "tern_ptr": "*i8", "alpha_ptr": "*fp32", "gs_ptr": f"*{w_t}",
                          "gw_ptr": f"*{w_t}", "R": "i32", "C": "i32", "K": "i32",
                          **{k: "constexpr" for k in ("X_BITS", "GRAD_SCORES", "GRAD_WEIGHT", "BLOCK_M", "BLOCK_N",
                                                      "BLOCK_K")}},
            "constexprs": dict(X_BITS=x_t == "bits", GRAD_SCORES=gs, GRAD_WEIGHT=gw, **gemm),
            "num_warps": gnw, "num_stages": gns})
    # The hidden LIF linear layers of the models have K and C multiples of 16 (8192/4096/2048/512 -> 256), so the
    # real launches get Triton's divisibility specialisation of K and C (vectorised tile loads and stores).
    ints = {"binary_linear_lif_fwd_kernel": ("K", "C"), "linear_lif_scan_kernel": ("C",),
            "linear_lif_bwd_scan_kernel": ("C",), "linear_bn_grad_fold_kernel": ("C",),
            "linear_grad_input_kernel": ("C", "K"), "linear_grad_weight_kernel": ("C", "K")}
    for spec in specs:
        spec["divisible_by_16"] = _hints(spec["signature"], *ints[spec["fn"].__name__])
    return specs


COMPILE_SPECS = _compile_specs()

__all__ = ["binw_linear_lif", "BinWLinearLIFFunction", "linear_lif_forward", "linear_lif_backward", "COMPILE_SPECS"]
