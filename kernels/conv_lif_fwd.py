"""Forward kernels of the fused binary-weight conv2d + LIF op (issue 3).

Layouts (chosen by the launcher in ``conv_lif.py``):
- input ``x``: channels-last ``[T, N, H, W, C_in]`` (int8 spikes, or fp16/fp32 analog), passed with strides so a
  direct-encoded image ``[N, H, W, C_in]`` is the same tensor with a zero T stride. Channels-last makes the
  GEMM's reduction axis (C_in) the contiguous one, so an im2col row of a tap is one coalesced load.
- ternary weight: int8 ``[KH, KW, C_in, C_out]`` (C_out contiguous: the B operand of ``tl.dot``, row-major).
- pre-activation ``y`` (only when autograd or training BatchNorm needs it): ``[T_y, N*OH*OW, C_out]`` contiguous,
  int16/int32 exact integers for spike input, fp32 for analog input; ``T_y`` is 1 for a direct-encoded input.
- output spikes / residual: any strides (the API's ``[T, N, C_out, OH, OW]`` float tensors).

The current is ``I[t] = (alpha * y) * a[c] + b[c] (+ residual[t])``: ``a, b`` per output channel fp32 (scale/shift,
or training BatchNorm folded by the host), ``alpha`` the subnet gain (read from a 1-element tensor so the host
never syncs on it). The product ``alpha * y`` first mirrors the reference (which convolves with ``alpha * tern``),
so dyadic inputs give bit-identical spikes.
"""
import itertools

import triton
import triton.language as tl

from .lif import lif_step


@triton.jit
def conv_tile(x_ptr, w_ptr, t, offs_m, offs_n, M, C_in, C_out, H, W, OH, OW,
              sxt, sxn, sxh, sxw, sxc, SH, SW, PH, PW,
              KH: tl.constexpr, KW: tl.constexpr, IS_SPIKE: tl.constexpr, DOT_FP16: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Implicit-GEMM tile of conv(X[t], tern): rows = output pixels ``offs_m``, cols = output channels ``offs_n``.

    Returns ``[BLOCK_M, BLOCK_N]`` int32 (exact, spike input: int8 x int8 dots) or fp32 (analog input).
    """
    ohw = OH * OW
    n = offs_m // ohw
    rem = offs_m % ohw
    oh = rem // OW
    ow = rem % OW
    m_ok = offs_m < M
    n_ok = offs_n < C_out
    offs_k = tl.arange(0, BLOCK_K)
    x_row = x_ptr + t * sxt + n * sxn
    if IS_SPIKE:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kh in tl.static_range(KH):
        ih = oh * SH - PH + kh
        h_ok = m_ok & (ih >= 0) & (ih < H)
        for kw in tl.static_range(KW):
            iw = ow * SW - PW + kw
            pix_ok = h_ok & (iw >= 0) & (iw < W)
            x_pix = x_row + ih * sxh + iw * sxw
            w_tap = w_ptr + (kh * KW + kw) * C_in * C_out
            for c0 in range(0, C_in, BLOCK_K):
                c = c0 + offs_k
                c_ok = c < C_in
                x_tile = tl.load(x_pix[:, None] + c[None, :] * sxc, mask=pix_ok[:, None] & c_ok[None, :], other=0)
                w_tile = tl.load(w_tap + c[:, None] * C_out + offs_n[None, :],
                                 mask=c_ok[:, None] & n_ok[None, :], other=0)
                if IS_SPIKE:
                    acc += tl.dot(x_tile, w_tile, out_dtype=tl.int32)
                elif DOT_FP16:
                    acc += tl.dot(x_tile, w_tile.to(tl.float16), out_dtype=tl.float32)
                else:
                    acc += tl.dot(x_tile.to(tl.float32), w_tile.to(tl.float32), input_precision="ieee")
    return acc


@triton.jit
def fire_tile(y, v, t, alpha, a, b, res_ptr, res_off, srt, out_ptr, out_off, sot, mask,
              decay, threshold, v_reset, HAS_RES: tl.constexpr, HARD_RESET: tl.constexpr,
              DECAY_INPUT: tl.constexpr):
    """One LIF step of an output tile: current from ``y``, update membrane ``v``, store spikes of step ``t``.

    Returns ``(spike, v)`` with ``spike`` fp32 0/1 (masked-out entries are 0).
    """
    cur = (y.to(tl.float32) * alpha) * a[None, :] + b[None, :]
    if HAS_RES:
        cur += tl.load(res_ptr + res_off + t * srt, mask=mask, other=0.0).to(tl.float32)
    u, spike, v = lif_step(v, cur, decay, threshold, v_reset, HARD_RESET, DECAY_INPUT)
    tl.store(out_ptr + out_off + t * sot, spike.to(out_ptr.dtype.element_ty), mask=mask)
    return tl.where(mask, spike, 0.0), v


@triton.jit
def binary_conv_lif_fwd_kernel(
        x_ptr, w_ptr, alpha_ptr, a_ptr, b_ptr, res_ptr, out_ptr, y_ptr, count_ptr, stat_ptr,
        T, M, C_in, C_out, H, W, OH, OW,
        sxt, sxn, sxh, sxw, sxc,
        srt, srn, src, srh, srw,
        sot, son, soc, soh, sow,
        SH, SW, PH, PW,
        decay, threshold, v_reset,
        KH: tl.constexpr, KW: tl.constexpr, IS_SPIKE: tl.constexpr, DOT_FP16: tl.constexpr, DIRECT: tl.constexpr,
        FIRE: tl.constexpr, HAS_RES: tl.constexpr, STORE_Y: tl.constexpr, COUNT: tl.constexpr, STATS: tl.constexpr,
        HARD_RESET: tl.constexpr, DECAY_INPUT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Fused conv + LIF over all T steps; each program owns a ``[BLOCK_M pixels, BLOCK_N channels]`` tile.

    FIRE: run the LIF scan in registers and store spikes (the float current never reaches memory).
    STORE_Y: also store the exact pre-activation y for backward / the BatchNorm second pass.
    STATS (BatchNorm pass 1, FIRE off): per-program partial sums of y and y^2 per channel into
    ``stat_ptr`` ``[2, cdiv(M, BLOCK_M), C_out]``. COUNT: atomically add per-channel spike counts to ``count_ptr``.
    DIRECT: the input has no time axis; the convolution runs once and drives all T steps.
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
    out_off = (n_img * son + oh * soh + ow * sow)[:, None] + offs_n[None, :] * soc
    res_off = (n_img * srn + oh * srh + ow * srw)[:, None] + offs_n[None, :] * src
    y_off = offs_m[:, None] * C_out + offs_n[None, :]
    if FIRE:
        alpha = tl.load(alpha_ptr).to(tl.float32)
        a = tl.load(a_ptr + offs_n, mask=n_ok, other=0.0)
        b = tl.load(b_ptr + offs_n, mask=n_ok, other=0.0)
    v = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    count = tl.zeros([BLOCK_N], dtype=tl.float32)
    if IS_SPIKE:
        sum_y = tl.zeros([BLOCK_N], dtype=tl.int64)
        sum_yy = tl.zeros([BLOCK_N], dtype=tl.int64)
    else:
        sum_y = tl.zeros([BLOCK_N], dtype=tl.float32)
        sum_yy = tl.zeros([BLOCK_N], dtype=tl.float32)
    if DIRECT:
        y = conv_tile(x_ptr, w_ptr, 0, offs_m, offs_n, M, C_in, C_out, H, W, OH, OW, sxt, sxn, sxh, sxw, sxc,
                      SH, SW, PH, PW, KH, KW, IS_SPIKE, DOT_FP16, BLOCK_M, BLOCK_N, BLOCK_K)
        if STORE_Y:
            tl.store(y_ptr + y_off, y.to(y_ptr.dtype.element_ty), mask=mask)
        if STATS:
            if IS_SPIKE:
                y_wide = y.to(tl.int64)
            else:
                y_wide = y
            sum_y += tl.sum(y_wide, 0)
            sum_yy += tl.sum(y_wide * y_wide, 0)
        if FIRE:
            for t in range(T):
                spike, v = fire_tile(y, v, t, alpha, a, b, res_ptr, res_off, srt, out_ptr, out_off, sot, mask,
                                     decay, threshold, v_reset, HAS_RES, HARD_RESET, DECAY_INPUT)
                count += tl.sum(spike, 0)
    else:
        for t in range(T):
            y = conv_tile(x_ptr, w_ptr, t, offs_m, offs_n, M, C_in, C_out, H, W, OH, OW, sxt, sxn, sxh, sxw, sxc,
                          SH, SW, PH, PW, KH, KW, IS_SPIKE, DOT_FP16, BLOCK_M, BLOCK_N, BLOCK_K)
            if STORE_Y:
                tl.store(y_ptr + t * M * C_out + y_off, y.to(y_ptr.dtype.element_ty), mask=mask)
            if STATS:
                if IS_SPIKE:
                    y_wide = y.to(tl.int64)
                else:
                    y_wide = y
                sum_y += tl.sum(y_wide, 0)
                sum_yy += tl.sum(y_wide * y_wide, 0)
            if FIRE:
                spike, v = fire_tile(y, v, t, alpha, a, b, res_ptr, res_off, srt, out_ptr, out_off, sot, mask,
                                     decay, threshold, v_reset, HAS_RES, HARD_RESET, DECAY_INPUT)
                count += tl.sum(spike, 0)
    if STATS:
        num_pid_m = tl.num_programs(0)
        tl.store(stat_ptr + pid_m * C_out + offs_n, sum_y, mask=n_ok)
        tl.store(stat_ptr + (num_pid_m + pid_m) * C_out + offs_n, sum_yy, mask=n_ok)
    if COUNT:
        tl.atomic_add(count_ptr + offs_n, count.to(tl.int32), mask=n_ok)


@triton.jit
def conv_lif_scan_kernel(
        y_ptr, alpha_ptr, a_ptr, b_ptr, res_ptr, out_ptr, count_ptr,
        T, M, C_out, OH, OW,
        srt, srn, src, srh, srw,
        sot, son, soc, soh, sow,
        decay, threshold, v_reset,
        DIRECT: tl.constexpr, HAS_RES: tl.constexpr, COUNT: tl.constexpr,
        HARD_RESET: tl.constexpr, DECAY_INPUT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """LIF scan over a stored pre-activation y ``[T_y, M, C_out]`` (BatchNorm pass 2): same epilogue as the fused
    kernel, with the batch statistics already folded into ``a, b`` by the host."""
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
    out_off = (n_img * son + oh * soh + ow * sow)[:, None] + offs_n[None, :] * soc
    res_off = (n_img * srn + oh * srh + ow * srw)[:, None] + offs_n[None, :] * src
    y_off = offs_m[:, None] * C_out + offs_n[None, :]
    alpha = tl.load(alpha_ptr).to(tl.float32)
    a = tl.load(a_ptr + offs_n, mask=n_ok, other=0.0)
    b = tl.load(b_ptr + offs_n, mask=n_ok, other=0.0)
    v = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    count = tl.zeros([BLOCK_N], dtype=tl.float32)
    if DIRECT:
        y = tl.load(y_ptr + y_off, mask=mask, other=0)
    for t in range(T):
        if not DIRECT:
            y = tl.load(y_ptr + t * M * C_out + y_off, mask=mask, other=0)
        spike, v = fire_tile(y, v, t, alpha, a, b, res_ptr, res_off, srt, out_ptr, out_off, sot, mask,
                             decay, threshold, v_reset, HAS_RES, HARD_RESET, DECAY_INPUT)
        count += tl.sum(spike, 0)
    if COUNT:
        tl.atomic_add(count_ptr + offs_n, count.to(tl.int32), mask=n_ok)


# ------------------------------------------------------------------------------------------------ configs
# Heuristic tile choice (no autotuning: the fused kernel has side effects - atomics, partial-stat rows whose
# count depends on BLOCK_M - and the choice below is what the compile report checks). tl.dot needs M, N >= 16 and
# K >= 32 for int8 (16 for fp16/fp32) on a GPU; these tiles are valid there and under the interpreter alike.

def forward_config(is_spike, c_in, c_out, m):
    """Tile config ``dict(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)`` of the fused forward kernel."""
    block_k = 32 if (is_spike and c_in <= 32) else (64 if is_spike else (16 if c_in <= 16 else 32))
    block_n = 16 if c_out <= 16 else (32 if c_out <= 32 else 64)
    block_m = 32 if m <= 4096 else 64 if m <= 65536 else 128
    num_warps = 4 if block_m * block_n <= 4096 else 8
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": num_warps, "num_stages": 2}


def scan_config(c_out, m):
    """Tile config of the LIF scan over a stored pre-activation."""
    block_n = 16 if c_out <= 16 else (32 if c_out <= 32 else 64)
    block_m = 32 if m <= 4096 else 64
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": 4, "num_stages": 1}


def _all_forward_configs(is_spike):
    seen = []
    for c_in, c_out, m in itertools.product((3, 32, 512), (16, 32, 512), (1024, 60000, 10 ** 6)):
        cfg = forward_config(is_spike, c_in, c_out, m)
        if cfg not in seen:
            seen.append(cfg)
    return seen


def _all_scan_configs():
    seen = []
    for c_out, m in itertools.product((16, 32, 512), (1024, 10 ** 6)):
        cfg = scan_config(c_out, m)
        if cfg not in seen:
            seen.append(cfg)
    return seen


_FWD_ARGS = ["x_ptr", "w_ptr", "alpha_ptr", "a_ptr", "b_ptr", "res_ptr", "out_ptr", "y_ptr", "count_ptr",
             "stat_ptr", "T", "M", "C_in", "C_out", "H", "W", "OH", "OW", "sxt", "sxn", "sxh", "sxw", "sxc",
             "srt", "srn", "src", "srh", "srw", "sot", "son", "soc", "soh", "sow", "SH", "SW", "PH", "PW",
             "decay", "threshold", "v_reset"]
_FWD_CONSTEXPRS = ["KH", "KW", "IS_SPIKE", "DOT_FP16", "DIRECT", "FIRE", "HAS_RES", "STORE_Y", "COUNT", "STATS",
                   "HARD_RESET", "DECAY_INPUT", "BLOCK_M", "BLOCK_N", "BLOCK_K"]


def _fwd_signature(x_type, y_type, stat_type, out_type):
    types = {"x_ptr": x_type, "w_ptr": "*i8", "alpha_ptr": "*fp32", "a_ptr": "*fp32", "b_ptr": "*fp32",
             "res_ptr": out_type, "out_ptr": out_type, "y_ptr": y_type, "count_ptr": "*i32", "stat_ptr": stat_type,
             "decay": "fp32", "threshold": "fp32", "v_reset": "fp32"}
    sig = {name: types.get(name, "i32") for name in _FWD_ARGS}
    sig.update({name: "constexpr" for name in _FWD_CONSTEXPRS})
    return sig


def _compile_specs():
    specs = []
    # (input kind, x pointer type, y type, stat type, DOT_FP16, DIRECT, kernel sizes)
    kinds = [("spike", "*i8", "*i16", "*i64", False, False, ((3, 3), (1, 1))),
             ("analog-fp32", "*fp32", "*fp32", "*fp32", False, False, ((3, 3),)),
             ("direct-fp32", "*fp32", "*fp32", "*fp32", False, True, ((3, 3),)),
             ("direct-fp16", "*fp16", "*fp32", "*fp32", True, True, ((3, 3),))]
    # (FIRE, STORE_Y, STATS, COUNT, HAS_RES): inference, training without BN, BN pass 1
    modes = [("infer", True, False, False, True, True), ("train", True, True, False, True, True),
             ("bn-stats", False, True, True, False, False)]
    for kind, x_type, y_type, stat_type, fp16, direct, ksizes in kinds:
        is_spike = kind == "spike"
        for (kh, kw), (mode, fire, store_y, stats, count, has_res), cfg, hard in itertools.product(
                ksizes, modes, _all_forward_configs(is_spike), (True, False)):
            if not fire and not hard:
                continue  # the neuron flags do not reach code when FIRE is off
            if not is_spike and cfg["BLOCK_K"] > 32:
                continue
            constexprs = {"KH": kh, "KW": kw, "IS_SPIKE": is_spike, "DOT_FP16": fp16, "DIRECT": direct,
                          "FIRE": fire, "HAS_RES": has_res, "STORE_Y": store_y, "COUNT": count, "STATS": stats,
                          "HARD_RESET": hard, "DECAY_INPUT": False, "BLOCK_M": cfg["BLOCK_M"],
                          "BLOCK_N": cfg["BLOCK_N"], "BLOCK_K": cfg["BLOCK_K"]}
            specs.append({
                "name": (f"binary_conv_lif_fwd_kernel[{kind},{kh}x{kw},{mode},hard={hard},"
                         f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']},w{cfg['num_warps']}]"),
                "fn": binary_conv_lif_fwd_kernel,
                "signature": _fwd_signature(x_type, y_type, stat_type, "*fp32"),
                "constexprs": constexprs, "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
    scan_args = ["y_ptr", "alpha_ptr", "a_ptr", "b_ptr", "res_ptr", "out_ptr", "count_ptr", "T", "M", "C_out",
                 "OH", "OW", "srt", "srn", "src", "srh", "srw", "sot", "son", "soc", "soh", "sow",
                 "decay", "threshold", "v_reset"]
    for (y_name, y_type, direct), cfg, hard in itertools.product(
            (("i16", "*i16", False), ("fp32", "*fp32", False), ("fp32-direct", "*fp32", True)),
            _all_scan_configs(), (True, False)):
        types = {"y_ptr": y_type, "alpha_ptr": "*fp32", "a_ptr": "*fp32", "b_ptr": "*fp32", "res_ptr": "*fp32",
                 "out_ptr": "*fp32", "count_ptr": "*i32", "decay": "fp32", "threshold": "fp32", "v_reset": "fp32"}
        sig = {name: types.get(name, "i32") for name in scan_args}
        constexprs = {"DIRECT": direct, "HAS_RES": True, "COUNT": True, "HARD_RESET": hard, "DECAY_INPUT": False,
                      "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"]}
        sig.update({name: "constexpr" for name in constexprs})
        specs.append({
            "name": f"conv_lif_scan_kernel[{y_name},hard={hard},{cfg['BLOCK_M']}x{cfg['BLOCK_N']}]",
            "fn": conv_lif_scan_kernel, "signature": sig, "constexprs": constexprs,
            "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
    return specs


COMPILE_SPECS = _compile_specs()
