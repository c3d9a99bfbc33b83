"""Ahead-of-time compile specs of every Triton kernel in kernels/, built on demand (read by
benchmarks/compile_report.py; importing this module traces and compiles nothing).

:func:`compile_specs` returns a list of dicts, one per configuration a launcher can use on a GPU:

    {"name": str,                 # unique, human readable, e.g. "lif_forward_kernel[fp16,hard=True]"
     "fn": <triton.jit function>,
     "signature": {arg: type},    # EVERY argument of fn ("*fp32", "*i8", "i32", "fp32", ... or "constexpr")
     "constexprs": {arg: value},  # a value for every argument typed "constexpr"
     "num_warps": int, "num_stages": int,
     "divisible_by_16": [arg, ...],   # args the launch sees 16-divisible (pointers: 16-byte aligned)
     "archs": [80, 90]}           # optional: the SM versions a per-arch config is picked for (default: all)

The tile configurations come from the launchers' own policy (kernels/tiles.py) enumerated over a grid of layer
sizes, so a config a launch can pick is a config the report compiles. One function per kernel module
(:data:`SPEC_BUILDERS`); a kernel module with a ``*_kernel`` that no spec covers is an error in the report.
"""
import functools
import itertools

from .lif import SURROGATE_CODES
from .optional import absent_for, jit_function
from .tiles import FOLD_BLOCK, LIF_BLOCK, LIF_NUM_WARPS, LINEAR_GEMM_LADDER, LINEAR_SCAN_LADDER, SUBNET_BLOCK, SUBNET_NUM_WARPS, \
    forward_config, forward_ladder, grad_input_config, grad_weight_config, linear_forward_config, \
    linear_forward_ladder, linear_gemm_config, linear_recompute_scan_config, linear_scan_config, narrowed, \
    recompute_scan_config, scan_config

ARCHS = (80, 90)  # the archs a spec is for unless it says ("archs": a config the policy picks per arch)
# Layer sizes the tile policy is enumerated over: channel counts (odd and tile multiples) and pixel counts.
_SIZES = (3, 5, 16, 32, 48, 64, 96, 128, 512)
_FWD_PIXELS = (1024, 60000, 10 ** 6)
_BWD_PIXELS = (1024, 10 ** 6)


def distinct(configs):
    """The configs in first-seen order without repeats."""
    seen = []
    for cfg in configs:
        if cfg not in seen:
            seen.append(cfg)
    return seen


def one_at_a_time(options):
    """Flag sets for the compile report: the first value of every option, then each other value of one option
    with the rest at their first value (each code path compiled once, not the whole cross product)."""
    base = [values[0] for values in options]
    sets = [tuple(base)]
    for i, values in enumerate(options):
        for value in values[1:]:
            sets.append(tuple(base[:i] + [value] + base[i + 1:]))
    return sets


def variants(configs, flag_sets):
    """Every tile config with the first (heaviest) flag set, plus every other flag set with each of the tiles that
    hold the most elements per thread (the ones closest to spilling)."""
    def per_thread(c):
        return (c["BLOCK_M"] * c["BLOCK_N"] // c["num_warps"], c.get("BLOCK_K", 1))
    top = max(per_thread(c) for c in configs)
    heaviest = [c for c in configs if per_thread(c) == top]
    return [(cfg, flag_sets[0]) for cfg in configs] + [(cfg, flags) for cfg in heaviest for flags in flag_sets[1:]]


def make_spec(name, fn, types, args, constexprs, cfg, default="i32"):
    """One compile spec; arguments not in ``types`` are ``default`` (i32), constexprs marked."""
    sig = {arg: types.get(arg, default) for arg in args}
    sig.update({arg: "constexpr" for arg in constexprs})
    return {"name": name, "fn": fn, "signature": sig, "constexprs": constexprs,
            "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


# Int arguments that real layers make multiples of 16 (channels 64..512, 32x32..4x4 maps, N = 128).
_SIZE_ARGS = ("C_in", "C_out", "M", "P", "H", "W", "OH", "OW")


def with_divisible_twins(specs):
    """Add, for every spec whose EVEN flags are all set (channel counts that are tile multiples), a twin compiled as
    the JIT specialises a real layer's launch: every pointer 16-byte aligned and the size ints 16-divisible."""
    twins = []
    for spec in specs:
        evens = [v for k, v in spec["constexprs"].items() if k.startswith("EVEN")]
        if evens and all(evens):
            sig = spec["signature"]
            hinted = [a for a, t in sig.items() if t.startswith("*")] + [a for a in _SIZE_ARGS if a in sig]
            twins.append(dict(spec, name=spec["name"][:-1] + ",div16]", divisible_by_16=hinted))
    return specs + twins


def with_cin16_twins(specs):
    """For every int8 forward spec on a masked path (channel counts that are not tile multiples), a twin compiled as
    a launch with 16-divisible input channels gets it (16, 48: the common case): pointers aligned, C_in and the
    pixel sizes (and C_out when EVEN_N) 16-divisible, which Triton's JIT specialises and which lets the masked
    tile loads vectorise. Channel counts that are not multiples of 16 (3, 5, ...) launch as the spec itself."""
    twins = []
    for spec in specs:
        consts = spec["constexprs"]
        evens = [v for k, v in consts.items() if k.startswith("EVEN")]
        if consts.get("IS_SPIKE") and not all(evens) and jit_function(spec["fn"]).__name__ == "binary_conv_lif_fwd_kernel":
            sig = spec["signature"]
            sizes = ["C_in", "M", "H", "W", "OH", "OW"] + (["C_out"] if consts["EVEN_N"] else [])
            hinted = [a for a, t in sig.items() if t.startswith("*")] + sizes
            twins.append(dict(spec, name=spec["name"][:-1] + ",cin16]", divisible_by_16=hinted))
    return twins


_CONV_FWD_ARGS = ["x_ptr", "w_ptr", "alpha_ptr", "a_ptr", "b_ptr", "res_ptr", "res_bits_ptr", "out_ptr", "y_ptr",
                  "stat_ptr", "bits_ptr", "T", "N", "M", "C_in", "C_out", "H", "W", "OH", "OW", "SH", "SW", "PH", "PW",
                  "decay", "threshold", "v_reset"]
_CONV_SCAN_ARGS = ["y_ptr", "alpha_ptr", "a_ptr", "b_ptr", "res_ptr", "res_bits_ptr", "out_ptr", "T", "M", "C_out",
              "decay", "threshold", "v_reset"]
# input kind -> (x pointer, y pointer, stats pointer, DOT_FP16, DIRECT)
_KINDS = {"spike": ("*i8", "*i16", "*i64", False, False), "spike-y32": ("*i8", "*i32", "*i64", False, False),
          # spikes as a fused layer hands them on (its float output dtype), converted to int8 in the kernel's registers
          "spike-fp32": ("*fp32", "*i16", "*i64", False, False), "spike-fp16": ("*fp16", "*i16", "*i64", False, False),
          "spike-bf16": ("*bf16", "*i16", "*i64", False, False),
          "analog-fp32": ("*fp32", "*fp32", "*fp32", False, False),
          "analog-fp16": ("*fp16", "*fp32", "*fp32", True, False),
          "direct-fp32": ("*fp32", "*fp32", "*fp32", False, True),
          "direct-fp16": ("*fp16", "*fp32", "*fp32", True, True)}
_FLOAT_SPIKES = ("spike-fp32", "spike-fp16", "spike-bf16")
# mode -> (FIRE, STORE_Y, STATS, STATS_I32, PACK): training without BN (y saved, or memory="recompute"), inference,
# BatchNorm pass 1 (int32 tile sums, or int64 for fan-ins too large for them), the benchmark baseline; PACK (the
# saved input spikes packed to bits in the kernel) in training, for spike input only
_MODES = {"train": (True, True, False, False, True), "train-recompute": (True, False, False, False, True),
          "infer": (True, False, False, False, False), "bn-stats": (False, True, True, True, True),
          "bn-stats-i64": (False, True, True, False, True), "gemm-only": (False, True, False, False, False)}
# the residual of a firing launch: "bits" a spiking one whose bits the kernel packs for backward (PACK_RES, in
# training), "float" one read only (an analog residual, or inference); first the heavier
_RESIDUALS = ("bits", "float")


def _residual(form, fire, training):
    """(HAS_RES, PACK_RES, name) of a launch with residual ``form`` (_RESIDUALS)."""
    pack = fire and training and form == "bits"
    return fire, pack, "bits" if pack else ("float" if fire else "none")


def conv_forward_specs():
    """Specs of kernels/conv_lif_fwd.py: every forward/scan tile config x the flag sets that matter."""
    from .conv_lif_fwd import binary_conv_lif_fwd_kernel, conv_lif_scan_kernel

    specs = []
    for is_spike in (True, False):
        def tile_configs(x_bytes):
            bases = (forward_config(is_spike, ci, co, m, interpret=False, x_bytes=x_bytes)
                     for ci, co, m in itertools.product(_SIZES, _SIZES, _FWD_PIXELS))
            return distinct(cfg for base in bases for cfg in narrowed(base, forward_ladder(is_spike, base)))
        cfgs = tile_configs(1)
        kinds = [k for k in _KINDS if k.startswith("spike") == is_spike and k not in _FLOAT_SPIKES]
        flag_sets = one_at_a_time([kinds, ((3, 3), (1, 1)), tuple(_MODES), _RESIDUALS, (True, False), (False, True),
                                   ("fp32", "fp16", "bf16")])
        launches = variants(cfgs, flag_sets)
        if is_spike:
            # spikes in a fused layer's float output (tiles for their element size, forward_config x_bytes) on every
            # such tile with the first flag set, fp32 (the widest operand tile) first so that the --ci subset (a
            # tile's first and last spec) compiles it and still the int8 twins (div16/cin16) that come last
            launches = distinct([(cfg, (kind,) + flag_sets[0][1:]) for kind in _FLOAT_SPIKES
                                 for cfg in tile_configs(2 if kind != "spike-fp32" else 4)] + launches)
        for cfg, (kind, (kh, kw), mode, res, hard, decay_input, out_type) in launches:
            x_type, y_type, stat_type, fp16, direct = _KINDS[kind]
            fire, store_y, stats, stats_i32, pack = _MODES[mode]
            has_res, pack_res, res_name = _residual(res, fire, mode.startswith("train"))
            types = {"x_ptr": x_type, "w_ptr": "*i8", "alpha_ptr": "*fp32", "a_ptr": "*fp32", "b_ptr": "*fp32",
                     "res_ptr": "*" + out_type, "res_bits_ptr": "*i32", "out_ptr": "*" + out_type, "y_ptr": y_type,
                     "stat_ptr": stat_type, "bits_ptr": "*i32", "decay": "fp32", "threshold": "fp32",
                     "v_reset": "fp32"}
            constexprs = {"KH": kh, "KW": kw, "IS_SPIKE": is_spike, "DOT_FP16": fp16, "DIRECT": direct,
                          "FIRE": fire, "HAS_RES": has_res, "PACK_RES": pack_res, "STORE_Y": store_y, "STATS": stats,
                          "PACK": pack and is_spike,
                          "HARD_RESET": hard, "DECAY_INPUT": decay_input, "EVEN_K": cfg["EVEN_K"],
                          "EVEN_N": cfg["EVEN_N"], "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"],
                          "BLOCK_K": cfg["BLOCK_K"], "STATS_I32": stats_i32}
            specs.append(make_spec(
                f"binary_conv_lif_fwd_kernel[{kind},{kh}x{kw},{mode},res={res_name},hard={hard},"
                f"decay_input={decay_input},"
                f"out={out_type},{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']},even={cfg['EVEN_K']:d}"
                f"{cfg['EVEN_N']:d},w{cfg['num_warps']}]",
                binary_conv_lif_fwd_kernel, types, _CONV_FWD_ARGS, constexprs, cfg))
    scan_cfgs = distinct(scan_config(co, m, interpret=False) for co, m in itertools.product(_SIZES, _FWD_PIXELS))
    flag_sets = one_at_a_time([(("i16", False), ("i32", False), ("fp32", False), ("fp32", True)), _RESIDUALS,
                               (True, False), (False, True), ("fp32", "fp16", "bf16")])
    for cfg, ((y_name, direct), res, hard, decay_input, out_type) in variants(scan_cfgs, flag_sets):
        has_res, pack_res, res_name = _residual(res, True, True)  # the scan runs in training (BatchNorm pass 2)
        types = {"y_ptr": "*" + y_name, "alpha_ptr": "*fp32", "a_ptr": "*fp32", "b_ptr": "*fp32",
                 "res_ptr": "*" + out_type, "res_bits_ptr": "*i32", "out_ptr": "*" + out_type, "decay": "fp32",
                 "threshold": "fp32", "v_reset": "fp32"}
        constexprs = {"DIRECT": direct, "HAS_RES": has_res, "PACK_RES": pack_res, "HARD_RESET": hard,
                      "DECAY_INPUT": decay_input, "EVEN_N": cfg["EVEN_N"], "BLOCK_M": cfg["BLOCK_M"],
                      "BLOCK_N": cfg["BLOCK_N"]}
        specs.append(make_spec(
            f"conv_lif_scan_kernel[{y_name}{',direct' if direct else ''},res={res_name},hard={hard},"
            f"decay_input={decay_input},"
            f"out={out_type},{cfg['BLOCK_M']}x{cfg['BLOCK_N']},even={cfg['EVEN_N']:d}]",
            conv_lif_scan_kernel, types, _CONV_SCAN_ARGS, constexprs, cfg))
    return with_divisible_twins(specs) + with_cin16_twins(specs)


def _tile_name(cfg):
    even = "".join(str(int(v)) for k, v in cfg.items() if k.startswith("EVEN"))
    dims = "x".join(str(cfg[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in cfg)
    return f"{dims},even={even},w{cfg['num_warps']},s{cfg['num_stages']}"


def _tile_constexprs(cfg):
    return {k: v for k, v in cfg.items() if k.startswith(("BLOCK", "EVEN"))}


def conv_backward_specs():
    """Specs of kernels/conv_lif_bwd.py: backward scan, BatchNorm grad fold, grad-input and grad-weight GEMMs."""
    from .conv_lif_bwd import bn_grad_fold_kernel, conv_grad_input_kernel, conv_grad_weight_kernel, \
        conv_lif_bwd_scan_kernel

    specs = []
    scan_args = ["y_ptr", "x_ptr", "w_ptr", "alpha_ptr", "a_ptr", "b_ptr", "mult_ptr", "res_ptr", "gout_ptr", "g_ptr",
                 "gres_ptr", "part_ptr", "T", "N", "M", "C_in", "C_out", "H", "W", "OH", "OW", "SH", "SW", "PH", "PW",
                 "decay", "threshold", "v_reset", "sg_alpha"]

    def scan_spec(name, cfg, y_type, x_type, w_type, neuron, res, io_type, constexprs):
        hard, detach, surrogate, decay_input = neuron
        types = {"y_ptr": "*" + y_type, "x_ptr": "*" + x_type, "w_ptr": "*" + w_type,
                 "decay": "fp32", "threshold": "fp32", "v_reset": "fp32", "sg_alpha": "fp32"}
        for arg in ("alpha_ptr", "a_ptr", "b_ptr", "mult_ptr", "g_ptr", "part_ptr"):
            types[arg] = "*fp32"
        for arg in ("res_ptr", "gout_ptr", "gres_ptr"):  # tensors in the caller's dtype
            types[arg] = "*" + io_type
        if res == "bits":  # a spiking residual as the forward kernel saved it (kernels/spike_bits.py)
            types["res_ptr"] = "*u8"
        constexprs = {"HAS_RES": True, "GRAD_RES": True, "HARD_RESET": hard, "DECAY_INPUT": decay_input,
                      "DETACH_RESET": detach, "SURROGATE": SURROGATE_CODES[surrogate], **constexprs}
        return make_spec(f"conv_lif_bwd_scan_kernel[{name},res={res},hard={hard},detach={detach},{surrogate},"
                         f"decay_input={decay_input},io={io_type},{_tile_name(cfg)}]",
                         conv_lif_bwd_scan_kernel, types, scan_args, constexprs, cfg)

    neuron_flags = [(True, False), (False, True), tuple(SURROGATE_CODES), (False, True)]
    # y saved ("save", and "recompute" with BatchNorm): the elementwise scan tiles
    scan_cfgs = distinct(scan_config(c, m, interpret=False) for c, m in itertools.product(_SIZES, _BWD_PIXELS))
    scan_flags = one_at_a_time([(("i16", False), ("i32", False), ("fp32", False), ("fp32", True)), (True, False),
                                _RESIDUALS, *neuron_flags, ("fp32", "fp16", "bf16")])
    for cfg, ((y_name, direct), gy, res, *neuron, io_type) in variants(scan_cfgs, scan_flags):
        constexprs = {"DIRECT": direct, "GY": gy, "RECOMPUTE": False, "KH": 1, "KW": 1, "IS_SPIKE": True,
                      "DOT_FP16": False, "EVEN_K": True, "BLOCK_K": 32, **_tile_constexprs(cfg)}
        specs.append(scan_spec(f"{y_name}{',direct' if direct else ''},gy={gy}", cfg, y_name, "fp32", "fp32",
                               neuron, res, io_type, constexprs))
    # memory="recompute" without BatchNorm: the forward's GEMM inside the scan
    for is_spike in (True, False):
        cfgs = distinct(recompute_scan_config(is_spike, ci, co, m, interpret=False)
                        for ci, co, m in itertools.product(_SIZES, _SIZES, _FWD_PIXELS))
        kinds = [k for k in _KINDS if k.startswith("spike") == is_spike and k not in ("spike-y32",) + _FLOAT_SPIKES]
        flags = one_at_a_time([kinds, (True, False), ((3, 3), (1, 1)), _RESIDUALS, *neuron_flags,
                               ("fp32", "fp16", "bf16")])
        for cfg, (kind, gy, (kh, kw), res, *neuron, io_type) in variants(cfgs, flags):
            x_type, _, _, fp16, direct = _KINDS[kind]
            constexprs = {"DIRECT": direct, "GY": gy, "RECOMPUTE": True, "KH": kh, "KW": kw, "IS_SPIKE": is_spike,
                          "DOT_FP16": fp16, "y_ptr": None, **_tile_constexprs(cfg)}  # y: None, not stored
            x_type = "*u8" if is_spike else x_type  # spikes are saved as bits (kernels/spike_bits.py)
            specs.append(scan_spec(f"recompute-{kind},gy={gy},{kh}x{kw}", cfg, "fp32", x_type[1:], "i8",
                                   neuron, res, io_type, constexprs))
    for y_name in ("i16", "i32", "fp32"):
        types = {"g_ptr": "*fp32", "y_ptr": "*" + y_name, "c1_ptr": "*fp32", "c2_ptr": "*fp32", "c3_ptr": "*fp32"}
        specs.append(make_spec(f"bn_grad_fold_kernel[{y_name}]", bn_grad_fold_kernel, types,
                               ["g_ptr", "y_ptr", "c1_ptr", "c2_ptr", "c3_ptr", "numel", "C_out"],
                               {"BLOCK": FOLD_BLOCK}, {"num_warps": 4, "num_stages": 1}))
    gi_args = ["g_ptr", "wt_ptr", "alpha_ptr", "dx_ptr", "P", "C_in", "C_out", "H", "W", "OH", "OW",
               "SH", "SW", "PH", "PW"]
    gi_cfgs = distinct(grad_input_config(ci, co, p, interpret=False)
                       for ci, co, p in itertools.product(_SIZES, _SIZES, _BWD_PIXELS))
    gi_flags = one_at_a_time([("fp32", "fp16", "bf16"), ((3, 3), (1, 1)), (True, False)])
    for cfg, (dx_name, (kh, kw), split) in variants(gi_cfgs, gi_flags):
        types = {"g_ptr": "*fp32", "wt_ptr": "*i8", "alpha_ptr": "*fp32", "dx_ptr": "*" + dx_name}
        constexprs = {"KH": kh, "KW": kw, "SPLIT": split, **_tile_constexprs(cfg)}
        specs.append(make_spec(f"conv_grad_input_kernel[{dx_name},{kh}x{kw},split={split},{_tile_name(cfg)}]",
                               conv_grad_input_kernel, types, gi_args, constexprs, cfg))
    gw_args = ["x_ptr", "g_ptr", "w_ptr", "s_ptr", "tern_ptr", "alpha_ptr", "gs_ptr", "gw_ptr",
               "P", "C_in", "C_out", "H", "W", "OH", "OW", "p_per_split", "SH", "SW", "PH", "PW"]
    gw_flags = one_at_a_time([("u8", "fp32", "fp16"), ((3, 3), (1, 1)), ((True, False), (True, True), (False, True)),
                              (True, False)])
    gw_archs = {}  # config (as a tuple) -> the archs it is picked for (warps are per arch)
    for arch, ci, co, p in itertools.product(ARCHS, _SIZES, _SIZES, _BWD_PIXELS):
        cfg = grad_weight_config(ci, co, p, interpret=False, arch=arch)
        gw_archs.setdefault(tuple(cfg.items()), set()).add(arch)
    # per arch: its configs, each other flag set with that arch's heaviest tiles (a config both archs pick once)
    gw_variants = distinct(v for arch in ARCHS
                           for v in variants([dict(k) for k, archs in gw_archs.items() if arch in archs], gw_flags))
    for cfg, (x_name, (kh, kw), (grad_s, grad_w), split) in gw_variants:
        types = {"x_ptr": "*" + x_name, "g_ptr": "*fp32", "w_ptr": "*fp32", "s_ptr": "*fp32",
                 "tern_ptr": "*i8", "alpha_ptr": "*fp32", "gs_ptr": "*fp32", "gw_ptr": "*fp32"}
        constexprs = {"KH": kh, "KW": kw, "GRAD_SCORES": grad_s, "GRAD_WEIGHT": grad_w, "SPLIT": split,
                      **_tile_constexprs(cfg)}
        specs.append(dict(make_spec(
            f"conv_grad_weight_kernel[{x_name},{kh}x{kw},scores={grad_s},weight={grad_w},split={split},"
            f"{_tile_name(cfg)}]", conv_grad_weight_kernel, types, gw_args, constexprs, cfg),
            archs=sorted(gw_archs[tuple(cfg.items())])))
    return with_divisible_twins(specs)


def _linear_fwd_signature(x_type, out_type, y_type, stats_type):
    return {"x_ptr": x_type, "tern_ptr": "*i8", "alpha_ptr": "*fp32", "a_ptr": "*fp32", "b_ptr": "*fp32",
            "res_ptr": "*fp32", "out_ptr": out_type, "y_ptr": y_type, "stats_ptr": stats_type, "bits_ptr": "*i32",
            "T": "i32", "N": "i32", "K": "i32", "C": "i32", "decay": "fp32", "threshold": "fp32", "v_reset": "fp32",
            **{k: "constexpr" for k in ("IS_SPIKE", "DOT_FP16", "DIRECT", "FIRE", "HAS_RES", "STORE_Y", "STATS", "PACK", "HARD_RESET", "DECAY_INPUT", "BLOCK_M", "BLOCK_N", "BLOCK_K")}}


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


_LINEAR_ROWS = tuple(2 ** i for i in range(4, 18))  # rows (N) and channel counts the recompute's tile ladder is
# enumerated over (every step of it is picked for some grid)


def linear_specs():
    """Specs of kernels/linear_lif_kernels.py (the linear forward, scans, BN fold and GEMMs)."""
    from .conv_lif_bwd import bn_grad_fold_kernel
    from .linear_lif_kernels import binary_linear_lif_fwd_kernel, \
        linear_grad_input_kernel, linear_grad_weight_kernel, linear_lif_bwd_scan_kernel, linear_lif_scan_kernel

    specs = []
    # Forward. Inputs: (name, is_spike, direct, x pointer type, dot_fp16, spike output dtypes).
    inputs = [("spike", True, False, "*i8", False, ("fp32", "fp16", "bf16")),
              # spikes as a fused layer hands them on (its float output), converted to int8 in registers
              # (fp32 last: the --ci subset compiles the last of a tile's specs, and its operand tile is the widest)
              ("spike-fp16", True, False, "*fp16", False, ("fp16",)),
              ("spike-bf16", True, False, "*bf16", False, ("bf16",)),
              ("spike-fp32", True, False, "*fp32", False, ("fp32",)),
              ("fp32", False, False, "*fp32", False, ("fp32", "bf16")),
              ("fp16", False, False, "*fp16", True, ("fp16",)),
              ("direct-fp32", False, True, "*fp32", False, ("fp32", "bf16")),
              ("direct-fp16", False, True, "*fp16", True, ("fp16",))]
    for (name, is_spike, direct, x_type, dot_fp16, out_types), tiles in (
            (kind, tiles) for kind in inputs
            for tiles in narrowed(linear_forward_config(kind[1], kind[4], interpret=False),
                                  linear_forward_ladder(kind[1]))):
        cfg = dict(tiles)
        nw, ns = cfg.pop("num_warps"), cfg.pop("num_stages")
        tile = f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']},w{nw}"
        y_type = "*i16" if is_spike else "*fp32"
        stats_type = "*i64" if is_spike else "*fp32"
        base = dict(IS_SPIKE=is_spike, DOT_FP16=dot_fp16, DIRECT=direct, **cfg)
        # BatchNorm pass 1: no firing; the neuron flags are unused.
        specs.append({"name": f"binary_linear_lif_fwd_kernel[{name},bn-stats,{tile}]", "fn": binary_linear_lif_fwd_kernel,
                      "signature": _linear_fwd_signature(x_type, "*" + out_types[0], y_type, stats_type),
                      "constexprs": dict(base, FIRE=False, HAS_RES=False, STORE_Y=True, STATS=True, PACK=is_spike,
                                         HARD_RESET=True, DECAY_INPUT=False),
                      "num_warps": nw, "num_stages": ns})
        # y alone (memory="recompute" with BatchNorm: y rebuilt before the backward scan, linear_lif._gemm_y)
        specs.append({"name": f"binary_linear_lif_fwd_kernel[{name},gemm-only,{tile}]", "fn": binary_linear_lif_fwd_kernel,
                      "signature": _linear_fwd_signature(x_type, "*" + out_types[0], y_type, stats_type),
                      "constexprs": dict(base, FIRE=False, HAS_RES=False, STORE_Y=True, STATS=False, PACK=False,
                                         HARD_RESET=True, DECAY_INPUT=False),
                      "num_warps": nw, "num_stages": ns})
        for (out_t, store_y, has_res), (hard, decay_input) in _covering(
                (out_types, (False, True), (False, True)), ((True, False), (False, True))):
            specs.append({
                "name": (f"binary_linear_lif_fwd_kernel[{name},out={out_t},store_y={store_y},res={has_res},"
                         f"hard={hard},decay_input={decay_input},{tile}]"),
                "fn": binary_linear_lif_fwd_kernel,
                "signature": _linear_fwd_signature(x_type, "*" + out_t, y_type, stats_type),
                "constexprs": dict(base, FIRE=True, HAS_RES=has_res, STORE_Y=store_y, STATS=False,
                                   PACK=is_spike and store_y, HARD_RESET=hard, DECAY_INPUT=decay_input),
                "num_warps": nw, "num_stages": ns})
    scans = narrowed(linear_scan_config(interpret=False), LINEAR_SCAN_LADDER)
    for scan, ((y_t, out_t, direct, has_res), (hard, decay_input)) in itertools.product(scans, _covering(
            (("fp32", "i16"), ("fp32", "fp16", "bf16"), (True, False), (False, True)),
            ((True, False), (False, True)))):
        if direct and y_t == "i16":
            continue
        tile = "" if scan == scans[0] else f",{scan['BLOCK_M']}x{scan['BLOCK_N']},w{scan['num_warps']}"
        scan = dict(scan)
        snw, sns = scan.pop("num_warps"), scan.pop("num_stages")
        specs.append({
            "name": (f"linear_lif_scan_kernel[y={y_t},out={out_t},direct={direct},res={has_res},"
                     f"hard={hard},decay_input={decay_input}{tile}]"),
            "fn": linear_lif_scan_kernel,
            "signature": {"y_ptr": f"*{y_t}", "alpha_ptr": "*fp32", "a_ptr": "*fp32", "b_ptr": "*fp32",
                          "res_ptr": "*fp32", "out_ptr": f"*{out_t}", "T": "i32", "N": "i32",
                          "C": "i32", "decay": "fp32", "threshold": "fp32", "v_reset": "fp32",
                          **{k: "constexpr" for k in ("DIRECT", "HAS_RES", "HARD_RESET", "DECAY_INPUT", "BLOCK_M",
                                                      "BLOCK_N")}},
            "constexprs": dict(DIRECT=direct, HAS_RES=has_res, HARD_RESET=hard, DECAY_INPUT=decay_input,
                               **scan),
            "num_warps": snw, "num_stages": sns})
    bwd_args = ["y_ptr", "x_ptr", "tern_ptr", "alpha_ptr", "a_ptr", "b_ptr", "mult_ptr", "res_ptr", "grad_spike_ptr",
                "g_ptr", "grad_res_ptr", "part_ptr", "T", "N", "K", "C", "decay", "threshold", "v_reset", "sg_alpha"]

    def bwd_scan_spec(name, cfg, y_t, x_t, res_mode, neuron, constexprs):
        hard, decay_input, detach, surrogate = neuron
        tile = "x".join(str(cfg[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in cfg) + f",w{cfg['num_warps']}"
        types = {"y_ptr": f"*{y_t}", "x_ptr": f"*{x_t}", "tern_ptr": "*i8",
                 **{a: "*fp32" for a in ("alpha_ptr", "a_ptr", "b_ptr", "mult_ptr", "res_ptr", "grad_spike_ptr",
                                         "g_ptr", "grad_res_ptr", "part_ptr")},
                 "decay": "fp32", "threshold": "fp32", "v_reset": "fp32", "sg_alpha": "fp32"}
        constexprs = dict(HAS_RES=res_mode != "none", GRAD_RES=res_mode == "res+grad", HARD_RESET=hard,
                          DECAY_INPUT=decay_input, DETACH_RESET=detach, SURROGATE=SURROGATE_CODES[surrogate],
                          **constexprs)
        return make_spec(f"linear_lif_bwd_scan_kernel[{name},{res_mode},hard={hard},decay_input={decay_input},"
                         f"detach={detach},{surrogate},{tile}]", linear_lif_bwd_scan_kernel, types,
                         bwd_args, constexprs, cfg)

    # y saved ("save", and "recompute" with BatchNorm): the elementwise scan tiles
    for scan, ((y_t, direct, res_mode, gy), neuron) in itertools.product(scans, _covering(
            (("fp32", "i16"), (True, False), ("none", "res", "res+grad"), (False, True)),
            ((True, False), (False, True), (False, True), tuple(SURROGATE_CODES)))):
        if direct and y_t == "i16":
            continue
        constexprs = dict(DIRECT=direct, RECOMPUTE=False, GY=gy, IS_SPIKE=True, DOT_FP16=False, BLOCK_K=32,
                          **_tile_constexprs(scan))
        specs.append(bwd_scan_spec(f"y={y_t},direct={direct},gy={gy}", scan, y_t, "fp32", res_mode, neuron,
                                   constexprs))
    # memory="recompute" without BatchNorm: the forward's GEMM inside the scan, on the forward's tiles
    # (name, is_spike, x pointer (spikes: the saved bits), DOT_FP16, DIRECT)
    rec_inputs = [("spike", True, "u8", False, False), ("fp32", False, "fp32", False, False),
                  ("fp16", False, "fp16", True, False), ("direct-fp32", False, "fp32", False, True),
                  ("direct-fp16", False, "fp16", True, True)]
    neuron_flags = [(True, False), (False, True), (False, True), tuple(SURROGATE_CODES)]
    for name, is_spike, x_t, fp16, direct in rec_inputs:
        cfgs = distinct(linear_recompute_scan_config(is_spike, fp16, n, c, interpret=False, sms=sms)  # every ladder step
                        for n, c, sms in itertools.product(_LINEAR_ROWS, _LINEAR_ROWS, (None, 108, 132)))
        flags = one_at_a_time([(True, False), ("res+grad", "none", "res"), *neuron_flags])
        for cfg, (gy, res_mode, *neuron) in variants(cfgs, flags):
            constexprs = dict(DIRECT=direct, RECOMPUTE=True, GY=gy, IS_SPIKE=is_spike, DOT_FP16=fp16, y_ptr=None,
                              **_tile_constexprs(cfg))  # y: None, not stored
            specs.append(bwd_scan_spec(f"recompute-{name},gy={gy}", cfg, "fp32", x_t, res_mode, neuron,
                                       constexprs))
    for y_t in ("i16", "fp32"):
        specs.append({
            "name": f"bn_grad_fold_kernel[linear,y={y_t}]", "fn": bn_grad_fold_kernel,
            "signature": {"g_ptr": "*fp32", "y_ptr": f"*{y_t}", "c1_ptr": "*fp32", "c2_ptr": "*fp32",
                          "c3_ptr": "*fp32", "numel": "i32", "C_out": "i32", "BLOCK": "constexpr"},
            "constexprs": {"BLOCK": FOLD_BLOCK}, "num_warps": 4, "num_stages": 1})
    gemms = [dict(g) for g in narrowed(linear_gemm_config(interpret=False), LINEAR_GEMM_LADDER)]
    for gemm, (dx_t, split) in itertools.product(gemms, (("fp32", True), ("fp16", True), ("bf16", True),
                                                         ("fp32", False))):
        gemm = dict(gemm)
        gnw, gns = gemm.pop("num_warps"), gemm.pop("num_stages")
        tile = f"{gemm['BLOCK_M']}x{gemm['BLOCK_N']}x{gemm['BLOCK_K']},w{gnw}"
        specs.append({
            "name": f"linear_grad_input_kernel[dx={dx_t},split={split},{tile}]", "fn": linear_grad_input_kernel,
            "signature": {"g_ptr": "*fp32", "tern_ptr": "*i8", "alpha_ptr": "*fp32", "dx_ptr": f"*{dx_t}",
                          "R": "i32", "C": "i32", "K": "i32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
                          "BLOCK_K": "constexpr", "SPLIT": "constexpr"},
            "constexprs": dict(gemm, SPLIT=split), "num_warps": gnw, "num_stages": gns})
    for gemm, (x_t, w_t, gs, gw, split) in itertools.product(gemms, [c + (True,) for c in itertools.product(
            ("bits", "fp32", "fp16"), ("fp32", "fp16", "bf16"), (True, False), (True, False))] + [
            ("bits", "fp32", True, False, False), ("fp32", "fp32", True, False, False)]):
        if not (gs or gw):
            continue
        gemm = dict(gemm)
        gnw, gns = gemm.pop("num_warps"), gemm.pop("num_stages")
        tile = f"{gemm['BLOCK_M']}x{gemm['BLOCK_N']}x{gemm['BLOCK_K']},w{gnw}"
        specs.append({
            "name": f"linear_grad_weight_kernel[x={x_t},w={w_t},scores={gs},weight={gw},split={split},{tile}]",
            "fn": linear_grad_weight_kernel,
            "signature": {"x_ptr": "*u8" if x_t == "bits" else f"*{x_t}", "g_ptr": "*fp32", "weight_ptr": f"*{w_t}",
                          "scores_ptr": f"*{w_t}", "tern_ptr": "*i8", "alpha_ptr": "*fp32", "gs_ptr": f"*{w_t}",
                          "gw_ptr": f"*{w_t}", "R": "i32", "C": "i32", "K": "i32",
                          **{k: "constexpr" for k in ("X_BITS", "GRAD_SCORES", "GRAD_WEIGHT", "BLOCK_M", "BLOCK_N",
                                                      "BLOCK_K", "SPLIT")}},
            "constexprs": dict(X_BITS=x_t == "bits", GRAD_SCORES=gs, GRAD_WEIGHT=gw, SPLIT=split, **gemm),
            "num_warps": gnw, "num_stages": gns})
    # The hidden LIF linear layers of the models have K and C multiples of 16 (8192/4096/2048/512 -> 256), so the
    # real launches get Triton's divisibility specialisation of K and C (vectorised tile loads and stores).
    ints = {"binary_linear_lif_fwd_kernel": ("K", "C"), "linear_lif_scan_kernel": ("C",),
            "linear_lif_bwd_scan_kernel": ("K", "C"), "bn_grad_fold_kernel": ("C_out",),
            "linear_grad_input_kernel": ("C", "K"), "linear_grad_weight_kernel": ("C", "K")}
    for spec in specs:
        spec["divisible_by_16"] = _hints(spec["signature"], *ints[jit_function(spec["fn"]).__name__])
    return specs


_FLOAT_TYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}


def _lif_base_specs():
    from .lif import lif_backward_kernel, lif_forward_kernel

    specs = []
    for dtype, (hard, decay_input) in itertools.product(_FLOAT_TYPES, itertools.product((True, False), repeat=2)):
        ptr = _FLOAT_TYPES[dtype]
        specs.append({
            "name": f"lif_forward_kernel[{dtype},hard={hard},decay_input={decay_input}]",
            "fn": lif_forward_kernel,
            "signature": {"x_ptr": ptr, "spike_ptr": ptr, "num_neurons": "i32", "num_steps": "i32",
                          "decay": "fp32", "threshold": "fp32", "v_reset": "fp32",
                          "HARD_RESET": "constexpr", "DECAY_INPUT": "constexpr", "BLOCK": "constexpr"},
            "constexprs": {"HARD_RESET": hard, "DECAY_INPUT": decay_input, "BLOCK": LIF_BLOCK},
            "num_warps": LIF_NUM_WARPS, "num_stages": 1,
        })
        for detach, surrogate in itertools.product((True, False), SURROGATE_CODES):
            specs.append({
                "name": (f"lif_backward_kernel[{dtype},hard={hard},decay_input={decay_input},"
                         f"detach={detach},{surrogate}]"),
                "fn": lif_backward_kernel,
                "signature": {"x_ptr": ptr, "grad_spike_ptr": ptr, "grad_x_ptr": "*fp32",
                              "num_neurons": "i32", "num_steps": "i32", "decay": "fp32", "threshold": "fp32",
                              "v_reset": "fp32", "alpha": "fp32",
                              "HARD_RESET": "constexpr", "DECAY_INPUT": "constexpr", "DETACH_RESET": "constexpr",
                              "SURROGATE": "constexpr", "BLOCK": "constexpr"},
                "constexprs": {"HARD_RESET": hard, "DECAY_INPUT": decay_input, "DETACH_RESET": detach,
                               "SURROGATE": SURROGATE_CODES[surrogate], "BLOCK": LIF_BLOCK},
                "num_warps": LIF_NUM_WARPS, "num_stages": 1,
            })
    return specs


def _with_divisibility_variants(specs, int_args):
    """Each spec twice: as launched with the int_args not divisible by 16, and (",div16") divisible (the usual
    real-size launch, where Triton's specialisation vectorises the loads)."""
    out = []
    for spec in specs:
        pointers = [a for a, t in spec["signature"].items() if t.startswith("*")]
        out.append(dict(spec, divisible_by_16=pointers))
        out.append(dict(spec, name=spec["name"][:-1] + ",div16]", divisible_by_16=pointers + list(int_args)))
    return out


def lif_specs():
    """Specs of kernels/lif.py (standalone LIF forward/backward), each with and without a 16-divisible size."""
    return _with_divisibility_variants(_lif_base_specs(), ("num_neurons",))


def subnet_specs():
    """Specs of kernels/subnet.py: the radix-select passes and the subnet write, per weight/score dtype, each with
    and without a 16-divisible ``numel``; pointers are 16-byte aligned."""
    from .subnet import RADIX_SHIFTS, radix_histogram_kernel, radix_select_kernel, subnet_write_kernel, \
        tie_count_kernel

    blk = {"BLOCK": SUBNET_BLOCK}
    base = []
    for st in ("fp32", "fp16", "bf16"):
        for shift in RADIX_SHIFTS:
            base.append(make_spec(f"radix_histogram_kernel[s={st},shift={shift}]", radix_histogram_kernel,
                                  {"scores_ptr": f"*{st}", "hist_ptr": "*i32", "state_ptr": "*i32"},
                                  ["scores_ptr", "hist_ptr", "state_ptr", "numel"], dict(blk, SHIFT=shift),
                                  {"num_warps": SUBNET_NUM_WARPS, "num_stages": 1}))
        base.append(make_spec(f"tie_count_kernel[s={st}]", tie_count_kernel,
                              {"scores_ptr": f"*{st}", "state_ptr": "*i32", "ties_ptr": "*i32"},
                              ["scores_ptr", "state_ptr", "ties_ptr", "numel"], dict(blk),
                              {"num_warps": SUBNET_NUM_WARPS, "num_stages": 1}))
    for wt, st in (("fp32", "fp32"), ("fp16", "fp16"), ("bf16", "bf16"), ("fp32", "fp16")):
        base.append(make_spec(f"subnet_write_kernel[w={wt},s={st}]", subnet_write_kernel,
                              {"weight_ptr": f"*{wt}", "scores_ptr": f"*{st}", "state_ptr": "*i32",
                               "tie_offset_ptr": "*i32", "tern_ptr": "*i8"},
                              ["weight_ptr", "scores_ptr", "state_ptr", "tie_offset_ptr", "tern_ptr", "numel"],
                              dict(blk), {"num_warps": SUBNET_NUM_WARPS, "num_stages": 1}))
    specs = []
    for spec in base:
        pointers = [a for a, t in spec["signature"].items() if t.startswith("*")]
        specs.append(dict(spec, divisible_by_16=pointers))
        specs.append(dict(spec, name=spec["name"][:-1] + ",div16]", divisible_by_16=pointers + ["numel"]))
    for shift in RADIX_SHIFTS:
        specs.append(make_spec(f"radix_select_kernel[shift={shift}]", radix_select_kernel,
                               {"hist_ptr": "*i32", "state_ptr": "*i32"}, ["hist_ptr", "state_ptr"], {"SHIFT": shift},
                               {"num_warps": 4, "num_stages": 1}))
    return specs


def gemm_specs():
    """Specs of kernels/gemm.py (its test hook; the split dots compile inside the GEMM kernels that call them)."""
    from .gemm import bf16_round_kernel

    return [{"name": "bf16_round_kernel[fp32]", "fn": bf16_round_kernel,
             "signature": {"x_ptr": "*fp32", "out_ptr": "*fp32", "numel": "i32", "BLOCK": "constexpr"},
             "constexprs": {"BLOCK": 1024}, "num_warps": 4, "num_stages": 1}]


# kernel module (kernels/<name>.py) -> the function building its specs
SPEC_BUILDERS = {"conv_lif_fwd": conv_forward_specs, "conv_lif_bwd": conv_backward_specs,
                 "linear_lif_kernels": linear_specs, "lif": lif_specs, "subnet": subnet_specs,
                 "gemm": gemm_specs}


def with_absent_tensors(spec):
    """``spec`` as the launch it describes compiles: the tensors its flags say are absent typed ``"constexpr"`` with
    value None (as Triton specialises a None argument, kernels/optional.py), ``fn`` the bare ``@triton.jit``
    function that ``ASTSource`` takes."""
    absent = absent_for(spec["fn"], spec["constexprs"])
    out = dict(spec, fn=jit_function(spec["fn"]), signature={**spec["signature"], **{a: "constexpr" for a in absent}},
               constexprs={**spec["constexprs"], **absent})
    if "divisible_by_16" in spec:
        out["divisible_by_16"] = [a for a in spec["divisible_by_16"] if a not in absent]
    return out


@functools.lru_cache(maxsize=None)
def _specs_of(module_name):
    return tuple(with_absent_tensors(spec) for spec in SPEC_BUILDERS[module_name]())


def compile_specs(modules=None):
    """``[(module_name, spec), ...]`` for the kernel modules named in ``modules`` (default: all), in a stable
    order; module_name is the kernels/<name>.py whose kernel ``spec["fn"]`` is."""
    names = list(SPEC_BUILDERS) if modules is None else [m for m in SPEC_BUILDERS if m in modules]
    return [(name, spec) for name in names for spec in _specs_of(name)]


__all__ = ["compile_specs", "SPEC_BUILDERS", "make_spec", "distinct", "one_at_a_time", "variants",
           "with_divisible_twins"]
