"""Tile policy of the Triton kernels: every launch configuration a launcher picks, decided here and only here.

Each function maps a layer's sizes to a dict of ``BLOCK_*`` / ``EVEN_*`` constexprs plus ``num_warps`` and
``num_stages``; kernels/specs.py enumerates the same functions over a grid of sizes so the compile report covers
every configuration a GPU launch can get. Under the interpreter (TRITON_INTERPRET=1) the pixel/row tiles are taller
(fewer programs: the interpreter's cost is per program) while the channel tiles and EVEN paths stay the GPU's.

Grid fill on a GPU (``sms``: the device's SM count, ``None`` on CPU and under the interpreter, where exactly one
config per shape is used): a heuristic, not autotuning (the fused kernels have side effects and their partial-sum
rows depend on the tile, and every config must be in the compile report). When a layer's grid has fewer programs
than the GPU has SMs, the launcher takes the next config of a short fixed ladder of narrower tiles
(:func:`fill_grid`: the fused forward, whose T-step epilogue needs the whole reduction in one program, and the
linear GEMMs), or splits the reduction (the conv grad-weight GEMM, :func:`grad_weight_split`: fp32 partial results
per split, summed by the host in a fixed order, so the result is deterministic).

Pure Python: importing this module compiles nothing.
"""
import os

# Fixed block sizes of the elementwise kernels.
FOLD_BLOCK = 1024          # BatchNorm grad fold (conv and linear)
LIF_BLOCK = 1024           # standalone LIF: neurons per program
LIF_NUM_WARPS = 8          # 4 elements per thread: at 8 (num_warps=4) the atan backward spills on sm_80
SUBNET_BLOCK = 1024        # ternary subnet pass
SUBNET_NUM_WARPS = 4


# ------------------------------------------------------------------------------------------------ conv forward
# Heuristic tile choice (no autotuning: the fused kernel has side effects - atomics, partial-stat rows whose
# count depends on BLOCK_M - and the choice below is what the compile report checks). tl.dot needs M, N >= 16 and
# K >= 32 for int8 (16 for fp16/fp32) on a GPU; these tiles are valid there and under the interpreter alike.

def interpreting(override=None):
    """``override`` if given, else whether TRITON_INTERPRET=1 is set. Under the interpreter the launchers use
    taller pixel tiles (fewer, larger programs: the interpreter's cost is per program and per loop iteration,
    nearly independent of the tile size). Only the pixel dimension changes, so the channel tiles and EVEN paths
    the tests exercise are the GPU's."""
    if override is not None:
        return bool(override)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


INTERPRET_ROWS = 128


def forward_config(is_spike, c_in, c_out, m, interpret=None, sms=None, x_bytes=1):
    """Launch config of the fused forward kernel: ``dict(BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, EVEN_N, num_warps,
    num_stages)``; the EVEN flags say the channel counts are tile multiples (no channel masks, aligned rows).
    ``sms``: the GPU's SM count; an int8 tile-multiple layer whose grid is smaller gets narrower tiles
    (``FORWARD_LADDER``: the T-step epilogue needs the whole reduction in one program, so no split-K here).

    Chosen so that every config compiles for sm_80/sm_90 without spilling (benchmarks/compile_report.py). Channel
    counts that are not tile multiples (first layers, odd test shapes) get small unpipelined tiles: their masked,
    unvectorised accesses cost registers, and those layers are small. Analog (fp32) inputs get narrower tiles than
    int8 spikes: an fp32 operand tile is 4x the registers. ``x_bytes``: the element size spikes arrive in (a fused
    layer's fp32/fp16/bf16 output, converted to int8 in registers): wider than int8, BLOCK_K stays 32 (at 64 the
    fp32 64x64 tile on 4 warps spilled 36 bytes on Triton 3.9's sm_80 build)."""
    block_k = (64 if c_in % 64 == 0 and x_bytes == 1 else 32) if is_spike else 16
    block_n = 64 if c_out % 64 == 0 else (32 if c_out % 32 == 0 else 16)
    even_k, even_n = c_in % block_k == 0, c_out % block_n == 0
    if even_k and even_n and is_spike:
        block_m = 64 if m <= 65536 else 128
        num_warps, num_stages = (8 if block_m == 128 else 4), 3  # K-major operands: a 3-deep cp.async pipeline
    elif even_k and even_n:
        block_m, block_n, num_warps, num_stages = 64, min(block_n, 32), 8, 2
    else:
        block_m, block_n, num_warps, num_stages = 32, 16, 4, 1
        even_n = c_out % block_n == 0
    if interpreting(interpret):
        block_m, sms = INTERPRET_ROWS, None
    cfg = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "EVEN_K": even_k, "EVEN_N": even_n,
           "num_warps": num_warps, "num_stages": num_stages}
    return fill_grid(cfg, forward_ladder(is_spike, cfg), lambda c: -(-m // c["BLOCK_M"]) * -(-c_out // c["BLOCK_N"]),
                     sms)


def forward_ladder(is_spike, cfg):
    """The narrowing steps a forward config can take on a GPU: ``FORWARD_LADDER`` for the int8 tile-multiple path
    (its channel tiles stay multiples), none for the others (masked or analog tiles are narrow already)."""
    return FORWARD_LADDER if is_spike and cfg["EVEN_K"] and cfg["EVEN_N"] else ()


# Narrower tiles, in order, for a grid smaller than the SM count (each step updates the previous config). Every
# config on a ladder is in kernels/specs.py (``narrowed``).
FORWARD_LADDER = ({"BLOCK_N": 32}, {"BLOCK_M": 32, "num_warps": 4})  # int8 forward, tile-multiple channels
LINEAR_FORWARD_LADDER = ({"BLOCK_N": 32}, {"BLOCK_M": 16}, {"BLOCK_N": 16})
LINEAR_GEMM_LADDER = ({"BLOCK_N": 32}, {"BLOCK_M": 32})
LINEAR_SCAN_LADDER = ({"BLOCK_N": 32, "num_warps": 4}, {"BLOCK_M": 16}, {"BLOCK_N": 16})  # elementwise, memory-bound


def narrowed(cfg, ladder):
    """``[cfg, cfg after step 1, cfg after steps 1-2, ...]`` for a ladder of narrowing steps."""
    out = [dict(cfg)]
    for step in ladder:
        out.append({**out[-1], **step})
    return out


def fill_grid(cfg, ladder, programs, sms):
    """The first config of ``narrowed(cfg, ladder)`` whose grid (``programs(config)`` programs) has at least ``sms``
    programs, else the narrowest; ``cfg`` itself when ``sms`` is None (CPU, interpreter: one config per shape)."""
    if sms is None:
        return cfg
    options = narrowed(cfg, ladder)
    for option in options:
        if programs(option) >= sms:
            return option
    return options[-1]


MIN_SPLIT_STEPS = 16  # a grad-weight split keeps at least this many BLOCK_K steps of the pixel reduction


def grad_weight_split(tiles, p, block_k, sms):
    """Number of splits of the conv grad-weight's pixel reduction (``p`` pixels, ``BLOCK_K`` per step) for a grid of
    ``tiles`` output tiles: enough for at least two programs per SM (``ceil(2·sms / tiles)``), each split keeping
    ``MIN_SPLIT_STEPS`` steps; 1 when ``sms`` is None (CPU, interpreter)."""
    if sms is None:
        return 1
    want = -(-2 * sms // max(tiles, 1))
    return max(1, min(want, -(-p // (MIN_SPLIT_STEPS * block_k))))


def stats_fit_int32(fan_in, block_m):
    """Whether a tile's column sums of y and y^2 fit int32 (``|y| <= fan_in``): the BatchNorm pass-1 kernel then
    sums in int32 and widens once per tile (STATS_I32), else it widens every element to int64 first."""
    return block_m * fan_in * fan_in < 2 ** 31


def scan_config(c_out, m, interpret=None):
    """Launch config of the elementwise LIF scans over a stored pre-activation (forward BatchNorm pass 2 and the
    backward scan): memory-bound, so small tiles that leave registers for the T loop: 4 elements per thread
    (at 8 per thread, 32x32 on 4 warps, Triton 3.9's sm_80 build of the forward scan spilled 4 bytes)."""
    block_n = 32 if c_out >= 32 else 16
    return {"BLOCK_M": INTERPRET_ROWS if interpreting(interpret) else 32, "BLOCK_N": block_n,
            "EVEN_N": c_out % block_n == 0, "num_warps": 8 if block_n == 32 else 4, "num_stages": 1}


def recompute_scan_config(is_spike, c_in, c_out, m, interpret=None):
    """Launch config of the backward scan with ``memory="recompute"`` (the forward's GEMM inside the scan): the
    forward's config, so an analog input's y is rebuilt with the forward's tiles and rounding. Spikes (read from
    their saved bits, kernels/spike_bits.py) give exact integers on any tile, so there the tile is chosen for the
    scan's registers (three fp32 accumulators live next to the GEMM's): 64 rows, BLOCK_K 32, 8 warps, which compiled
    without spills on Triton 3.6 and 3.9 for every channel case; the forward's own tiles spilled (32 elements per
    thread; BLOCK_K 64 on 3.9's sm_80; and 8-360 bytes at 64-255 registers for the masked 32-row tiles on 2 or 4
    warps, depending on version and arch)."""
    cfg = forward_config(is_spike, c_in, c_out, m, interpret=False)
    if is_spike:
        cfg.update(BLOCK_M=64, BLOCK_K=32, num_warps=8)
    if interpreting(interpret):
        cfg["BLOCK_M"] = INTERPRET_ROWS
    return cfg


# ------------------------------------------------------------------------------------------------ conv backward
# The backward scan uses the forward scan's tiling (``scan_config``). The GEMMs split the fp32 gradient into bf16
# terms (kernels/gemm.py), so their tiles are narrower than the int8 forward's; channel counts that are not tile multiples get small,
# unpipelined tiles (masked accesses do not vectorise). Every config is in kernels/specs.py.

def _channel_tile(c, widest):
    return widest if c % widest == 0 else (32 if c % 32 == 0 and widest > 32 else 16)


def grad_input_config(c_in, c_out, p, interpret=None):
    """Launch config of the grad-input implicit GEMM (rows: input pixels, cols: C_in, K over C_out x taps). The
    tile-multiple path runs a 3-stage cp.async pipeline (at 2 stages each K step waited for its own loads)."""
    block_k = 32 if c_out % 32 == 0 else 16
    block_n = _channel_tile(c_in, 64)
    even_k, even_n = c_out % block_k == 0, c_in % block_n == 0
    if even_k and even_n:
        cfg = {"BLOCK_M": 64, "BLOCK_N": block_n, "BLOCK_K": block_k, "EVEN_K": True, "EVEN_N": True,
               "num_warps": 4, "num_stages": 3}
    else:
        block_n, block_k = (16 if c_in <= 16 else 32), 16
        cfg = {"BLOCK_M": 32, "BLOCK_N": block_n, "BLOCK_K": block_k, "EVEN_K": c_out % block_k == 0,
               "EVEN_N": c_in % block_n == 0, "num_warps": 4, "num_stages": 1}
    if interpreting(interpret):
        cfg["BLOCK_M"] = INTERPRET_ROWS
    return cfg


def grad_weight_config(c_in, c_out, p, interpret=None, arch=None):
    """Launch config of the grad-weight implicit GEMM (rows: C_in of one tap, cols: C_out, K over pixels).
    ``arch``: the GPU's compute capability as an int (80, 90; None on CPU). Tile-multiple layers run a 3-stage
    cp.async pipeline; before sm_90 tiles of 64x32 and up take 8 warps (at 4 warps and 3 stages 64x64 spilled on
    sm_80 on Triton 3.6, 64x32 on 3.9)."""
    block_m = _channel_tile(c_in, 64)
    block_n = _channel_tile(c_out, 64)
    even_m, even_n = c_in % block_m == 0, c_out % block_n == 0
    if even_m and even_n:
        wide = block_m * block_n >= 64 * 32 and arch is not None and arch < 90
        cfg = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": 32, "EVEN_M": True, "EVEN_N": True,
               "num_warps": 8 if wide else 4, "num_stages": 3}
    else:
        block_m, block_n = (16 if c_in <= 16 else 32), (16 if c_out <= 16 else 32)
        cfg = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": 32, "EVEN_M": c_in % block_m == 0,
               "EVEN_N": c_out % block_n == 0, "num_warps": 4, "num_stages": 1}
    if interpreting(interpret):
        cfg["BLOCK_K"] = INTERPRET_ROWS  # the pixel axis is this GEMM's K
    return cfg


# ------------------------------------------------------------------------------------------------ linear
# GPU tiles respect tl.dot minimums (M, N >= 16; K >= 32 for int8, >= 16 otherwise); the interpreter (one config,
# tiny tiles) keeps test grids small. Every GPU config below is in kernels/specs.py.
# Keyed by input kind. fp16 analog at 4 warps spills on sm_90; fp32 spilled with BLOCK_K=64 (measured with tf32x3
# dots, before the three-term bf16 split).
_LINEAR_FWD_GPU = {"spike": dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
                   "fp16": dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3),
                   "fp32": dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)}
_LINEAR_FWD_INTERP = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, num_warps=4, num_stages=1)
_LINEAR_SCAN_GPU = dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=1)  # 4 warps: the backward scan spills
_LINEAR_SCAN_INTERP = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
_LINEAR_GEMM_GPU = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)
_LINEAR_GEMM_INTERP = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1)


def linear_forward_config(is_spike, dot_fp16, rows=1, cols=1, interpret=None, sms=None):
    """Tile config of binary_linear_lif_fwd_kernel (``rows`` = N, ``cols`` = C: its grid): dict of BLOCK_M/N/K,
    num_warps, num_stages. With ``sms`` (GPU) a spike layer whose grid is smaller than the SM count gets narrower
    tiles (``LINEAR_FORWARD_LADDER``; VGG-11's fc 2048->256 at N=128: 16 programs at 32x64, 128 at 16x16)."""
    if interpreting(interpret):
        return dict(_LINEAR_FWD_INTERP)
    cfg = dict(_LINEAR_FWD_GPU["spike" if is_spike else ("fp16" if dot_fp16 else "fp32")])
    return fill_grid(cfg, linear_forward_ladder(is_spike), lambda c: -(-rows // c["BLOCK_M"]) * -(-cols // c["BLOCK_N"]),
                     sms)


def linear_forward_ladder(is_spike):
    """The narrowing steps of the linear forward on a GPU: ``LINEAR_FORWARD_LADDER`` for spikes (the hidden
    layers), none for an analog input (a first layer; fp16 needs 8 warps, which a narrow tile cannot use)."""
    return LINEAR_FORWARD_LADDER if is_spike else ()


def linear_scan_config(rows=1, cols=1, interpret=None, sms=None):
    """Tile config of the linear elementwise scan kernels (forward pass 2 and backward scan; grid over ``rows`` = N
    and ``cols`` = C); with ``sms`` (GPU) narrower tiles while the grid is smaller (``LINEAR_SCAN_LADDER``: a
    memory-bound pass on 16 programs, VGG-11's fc at N=128, cannot draw the GPU's bandwidth)."""
    if interpreting(interpret):
        return dict(_LINEAR_SCAN_INTERP)
    return fill_grid(dict(_LINEAR_SCAN_GPU), LINEAR_SCAN_LADDER,
                     lambda c: -(-rows // c["BLOCK_M"]) * -(-cols // c["BLOCK_N"]), sms)


def linear_recompute_scan_config(is_spike, dot_fp16, rows=1, cols=1, interpret=None, sms=None):
    """Tile config of linear_lif_bwd_scan_kernel with ``memory="recompute"`` (the forward's GEMM inside the scan):
    the forward's tiles (``linear_forward_config``, its grid filling included: BLOCK_M/N/K, so an analog input's y
    is rebuilt with the forward's K blocks and rounding) on the warps that compiled without spills on Triton 3.6
    and 3.9, sm_80 and sm_90: 8 for the 32x64 tiles of int8 and fp32 input (at 4 they spilled 8-24 bytes on 3.6),
    4 for fp16 input and the narrowed tiles (at 8 the direct fp16 tile and the 16x32 int8 tile spilled 8 bytes on
    3.9's sm_90)."""
    cfg = linear_forward_config(is_spike, dot_fp16, rows, cols, interpret=interpret, sms=sms)
    if not interpreting(interpret):
        cfg["num_warps"] = 8 if cfg["BLOCK_M"] * cfg["BLOCK_N"] >= 2048 and not dot_fp16 else 4
    return cfg


def linear_gemm_config(rows=1, cols=1, interpret=None, sms=None):
    """Tile config of the linear backward GEMMs (grad input: ``rows`` = T·N, ``cols`` = K; grad weight: ``rows`` =
    C, ``cols`` = K); with ``sms`` (GPU) narrower tiles while the grid is smaller (``LINEAR_GEMM_LADDER``)."""
    if interpreting(interpret):
        return dict(_LINEAR_GEMM_INTERP)
    return fill_grid(dict(_LINEAR_GEMM_GPU), LINEAR_GEMM_LADDER,
                     lambda c: -(-rows // c["BLOCK_M"]) * -(-cols // c["BLOCK_N"]), sms)


def launch_kwargs(cfg):
    """The constexpr tile arguments and launch options of a config, as keyword arguments of a kernel launch."""
    return {k: v for k, v in cfg.items() if k.startswith(("BLOCK", "EVEN")) or k in ("num_warps", "num_stages")}
