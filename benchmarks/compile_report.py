"""Ahead-of-time compile report for every Triton kernel in kernels/ (no GPU needed).

Usage:
    python benchmarks/compile_report.py [--arch 80 90] [--filter SUBSTR] [--jobs N] [--json PATH]
                                        [--keep-cubins DIR] [--ci]

The specs come from ``kernels/specs.py``: ``compile_specs()`` returns ``(module, spec)`` pairs, built on demand
from the launchers' tile policy (``kernels/tiles.py``), one dict per config a launcher can use on a GPU:

    {"name": str,                 # unique, human readable, e.g. "lif_forward_kernel[fp16,hard=True]"
     "fn": <triton.jit function>,
     "signature": {arg: type},    # EVERY argument of fn: "*fp32", "*fp16", "*bf16", "*i8", "*u8", "*i16",
                                  # "*i32", "i32", "i64", "fp32", ... or "constexpr"
     "constexprs": {arg: value},  # a value for every argument typed "constexpr"
     "num_warps": int, "num_stages": int,
     "divisible_by_16": [arg, ...],   # optional: args the launch sees 16-divisible (pointers: 16-byte aligned)
     "archs": [90]}               # optional: the only SM versions the launchers pick this config for (e.g. a
                                  # pipeline depth that spills elsewhere); compiled for those of --arch only

Triton's JIT specialises every pointer that is 16-byte aligned and every int argument divisible by 16
("tt.divisibility" = 16), which is what makes loads vectorise; an AOT compile must be told. Without
"divisible_by_16" a spec is compiled as a launch with all pointer arguments aligned (fresh torch tensors
are) and no int argument divisible by 16; list the int arguments (e.g. K) that real layer sizes make
divisible to compile the variant a real model launches.

Kernel entry points are named ``*_kernel``; a ``*_kernel`` function of a kernels/ module that no spec covers is an error
(helpers such as ``lif_step`` are only compiled inside the kernels that call them).

Each spec is compiled for each arch (sm_80, sm_90 by default) with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and the cubin is read with
``cuobjdump --dump-resource-usage``, ``cuobjdump -sass`` and ``ptxas -v`` (all shipped in the triton wheel).
One row per spec x arch: registers, spill store/load bytes, stack frame bytes, shared memory (Triton's
dynamic allocation + static), the CTAs per SM those allow (``ctas_per_sm``), and read from the SASS: the
tensor-core MMA instructions by opcode (``mma``: IGMMA/HGMMA/GMMA on sm_90, IMMA/HMMA on sm_80), ``FFMA``
count, byte stores to shared memory (``STS.U8``: an operand transposed byte by byte) and the deepest
``DEPBAR.LE SBx, N`` wait (``depbar``: N = cp.async groups left in flight; 0 means each step waits for its
own loads, no prefetch). ``gemm`` is true when the kernel's Triton IR has a ``tt.dot``.

The exit status is 1 when a module fails to import, a spec is malformed, a compile fails, a config spills
(ptxas spill stores or loads > 0) or needs more shared memory than the arch offers, a ``gemm`` kernel has no
tensor-core MMA instruction on an arch, or the vectorised int8 forward (a ``*_fwd_kernel`` spec with IS_SPIKE
and every EVEN flag) still stores bytes to shared memory (``STS.U8``, see ``is_int8_forward``); else 0. ``--json PATH`` writes the rows as a list of objects
with at least the keys kernel, config, arch (80/90), gemm, regs, spill_bytes, smem_bytes, mma, ffma, sts_u8,
cubin (the file name ``--keep-cubins DIR`` stores the cubin under).

TRITON_INTERPRET must be unset for compiling: if it is set, the script re-executes itself without it.
"""

import argparse
import collections
import concurrent.futures
import hashlib
import importlib
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNELS_DIR = REPO_ROOT / "kernels"
DEFAULT_ARCHS = (80, 90)
# Max dynamic shared memory per block (opt-in), bytes.
MAX_SHARED_BYTES = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
SPEC_KEYS = {"name", "fn", "signature", "constexprs", "num_warps", "num_stages"}  # required; "divisible_by_16",
# "archs" optional
# Per-SM limits for the occupancy estimate: registers, threads, CTAs, shared memory (bytes; 1 KiB reserved per CTA).
SM_LIMITS = {80: dict(regs=65536, threads=2048, ctas=32, smem=167936),
             90: dict(regs=65536, threads=2048, ctas=32, smem=233472)}
MMA_OPCODES = ("HGMMA", "IGMMA", "QGMMA", "GMMA", "HMMA", "IMMA", "BMMA", "DMMA")


def _ensure_not_interpreting():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def _kernel_package():
    """Return the package prefix under which kernels/ is importable ("binwslt.kernels" or "kernels")."""
    try:
        pkg = importlib.import_module("binwslt.kernels")
        if pathlib.Path(pkg.__file__).resolve().parent == KERNELS_DIR:
            return "binwslt.kernels"
    except ImportError:
        pass
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    return "kernels"


def kernel_module_names():
    """Names of the kernels/*.py modules (without package prefix), sorted."""
    return sorted(p.stem for p in KERNELS_DIR.glob("*.py") if p.stem != "__init__")


def _validate_spec(spec, module_name):
    """Return a list of problems with one spec of kernels/specs.py (empty if fine)."""
    import triton

    problems = []
    if not isinstance(spec, dict):
        return [f"{module_name}: spec is {type(spec).__name__}, expected dict"]
    missing = SPEC_KEYS - spec.keys()
    if missing:
        return [f"{module_name}: spec {spec.get('name', '?')!r} lacks keys {sorted(missing)}"]
    fn = spec["fn"]
    if not isinstance(fn, triton.runtime.JITFunction):
        return [f"{module_name}: spec {spec['name']!r}: fn is not a @triton.jit function"]
    args = list(fn.arg_names)
    sig = spec["signature"]
    if set(sig) != set(args):
        problems.append(f"{spec['name']}: signature args {sorted(sig)} != kernel args {sorted(args)}")
    const_args = {a for a, t in sig.items() if t == "constexpr"}
    hinted = spec.get("divisible_by_16")
    if hinted is not None:
        unknown = set(hinted) - set(sig)
        bad = {a for a in set(hinted) & set(sig) if sig[a] == "constexpr" or not (sig[a].startswith("*") or
                                                                              sig[a].startswith("i"))}
        if unknown or bad:
            problems.append(f"{spec['name']}: divisible_by_16 names unknown args {sorted(unknown)} or "
                            f"non-pointer/non-int args {sorted(bad)}")
    if set(spec["constexprs"]) != const_args:
        problems.append(f"{spec['name']}: constexprs {sorted(spec['constexprs'])} != args typed constexpr "
                        f"{sorted(const_args)}")
    archs = spec.get("archs")
    if archs is not None and (not archs or not all(isinstance(a, int) for a in archs)):
        problems.append(f"{spec['name']}: archs must be a non-empty list of SM versions, got {archs!r}")
    return problems


def collect_specs(module_filter=None):
    """Gather the specs of kernels/specs.py and check them against every kernel module.

    Returns (specs, problems): specs is a list of (module_name, index, spec), index into
    ``specs.compile_specs()``; problems a list of strings (a kernel module that fails to import, a malformed
    spec, a ``*_kernel`` of a module that no spec covers, duplicate names).
    """
    import triton

    package = _kernel_package()
    jit_function = importlib.import_module(f"{package}.optional").jit_function
    problems = []
    try:
        all_specs = importlib.import_module(f"{package}.specs").compile_specs()
    except Exception as exc:  # a broken spec module must show up in the report, not abort it
        return [], [f"specs: building the compile specs failed: {type(exc).__name__}: {exc}"]
    specs, covered = [], set()
    for index, (module_name, spec) in enumerate(all_specs):
        spec_problems = _validate_spec(spec, module_name)
        problems.extend(spec_problems)
        if not spec_problems:
            covered.add((spec["fn"].__module__, spec["fn"].__name__))
            if not module_filter or module_name in module_filter:
                specs.append((module_name, index, spec))
    for name in kernel_module_names():
        if module_filter and name not in module_filter:
            continue
        try:
            module = importlib.import_module(f"{package}.{name}")
        except Exception as exc:
            problems.append(f"{name}: import failed: {type(exc).__name__}: {exc}")
            continue
        for fn_name, obj in sorted(vars(module).items()):
            fn = jit_function(obj)
            if isinstance(fn, triton.runtime.JITFunction) and fn.__module__ == module.__name__ \
                    and fn_name.endswith("_kernel") and (module.__name__, fn_name) not in covered:
                problems.append(f"{name}: kernel {fn_name} has no entry in kernels/specs.py")
    names = [s["name"] for _, _, s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        problems.append(f"duplicate spec names: {duplicates}")
    return specs, problems


def _nvidia_tool(name):
    import triton

    path = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else name


def _ptxas_for(arch):
    """The ptxas Triton itself uses for sm_<arch> (newer Triton ships a second one for sm_90 and up)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError:
        return _nvidia_tool("ptxas")
    try:
        return get_ptxas(arch).path
    except TypeError:  # Triton releases whose get_ptxas takes no arch
        return get_ptxas().path


def parse_resource_usage(text):
    """Parse ``cuobjdump --dump-resource-usage`` output into {"REG", "STACK", "SHARED", "LOCAL"} (ints)."""
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        match = re.search(rf"\b{key}:(\d+)", text)
        if match is None:
            raise ValueError(f"cuobjdump output has no {key} field:\n{text}")
        usage[key] = int(match.group(1))
    return usage


def parse_ptxas_spills(text):
    """Parse ``ptxas -v`` output into {"spill_stores": int, "spill_loads": int} (bytes)."""
    match = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if match is None:
        raise ValueError(f"ptxas -v output has no spill line:\n{text}")
    return {"spill_stores": int(match.group(1)), "spill_loads": int(match.group(2))}


def _ptx_target(ptx):
    match = re.search(r"^\.target\s+(sm_\w+)", ptx, re.MULTILINE)
    if match is None:
        raise ValueError("PTX has no .target line")
    return match.group(1)


_SASS_LINE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+([^;]*);")


def sass_opcodes(sass):
    """The instruction opcodes (with modifiers, predicate guard dropped) of ``cuobjdump -sass`` output, in order,
    each with its operand text: a list of ``(opcode, operands)``."""
    out = []
    for match in _SASS_LINE.finditer(sass):
        tokens = match.group(1).split(None, 1)
        if tokens and tokens[0].startswith("@"):
            tokens = tokens[1].split(None, 1) if len(tokens) > 1 else []
        if tokens:
            out.append((tokens[0], tokens[1] if len(tokens) > 1 else ""))
    return out


def sass_counts(sass):
    """Counts the report gates on, from SASS text: ``{"mma": {opcode: n}, "ffma": n, "sts_u8": n, "depbar": N or
    None, "instructions": n}``. ``mma`` keys are full opcodes (e.g. ``HGMMA.64x64x16.F32.BF16``) whose root is a
    tensor-core MMA; ``depbar`` is the largest N of ``DEPBAR.LE SBx, N``."""
    mma = collections.Counter()
    ffma = sts_u8 = 0
    depbar = None
    ops = sass_opcodes(sass)
    for opcode, operands in ops:
        root = opcode.split(".", 1)[0]
        if root in MMA_OPCODES:
            mma[opcode] += 1
        elif root == "FFMA":
            ffma += 1
        elif opcode.startswith("STS.U8"):
            sts_u8 += 1
        elif opcode.startswith("DEPBAR"):
            match = re.search(r"SB\d+\s*,\s*(0x[0-9a-fA-F]+|\d+)", operands)
            if match:
                depbar = max(depbar or 0, int(match.group(1), 0))
    return {"mma": dict(sorted(mma.items())), "ffma": ffma, "sts_u8": sts_u8, "depbar": depbar,
            "instructions": len(ops)}


def ctas_per_sm(arch, regs, smem, num_warps):
    """CTAs of this kernel one SM holds at once, limited by registers (allocated per warp in units of 256), threads,
    the CTA limit and shared memory (None for an arch without a table entry)."""
    lim = SM_LIMITS.get(arch)
    if lim is None:
        return None
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = lim["regs"] // (per_warp * num_warps)
    by_threads = lim["threads"] // (32 * num_warps)
    by_smem = lim["smem"] // (smem + 1024) if smem else lim["ctas"]
    return max(0, min(by_regs, by_threads, lim["ctas"], by_smem))


def cubin_name(spec_name, arch):
    """A short file-system-safe cubin name for a spec: kernel function, hash of the full spec name, arch."""
    digest = hashlib.sha1(spec_name.encode()).hexdigest()[:12]
    return f"{spec_name.split('[', 1)[0]}-{digest}-sm{arch}.cubin"


def is_int8_forward(spec):
    """True for a forward kernel's vectorised int8 (spike) path, the one that must not store bytes to shared
    memory: IS_SPIKE with every EVEN flag set (channel counts that are tile multiples), or a masked path compiled
    with 16-divisible input channels (``C_in`` in ``divisible_by_16``: 16 or 48 channels against BLOCK_K=32, whose
    masked loads the JIT's divisibility specialisation vectorises). The masked paths with other channel counts (3,
    5, ...) load bytes one by one and so store them to shared memory one by one too (their STS.U8 count is
    reported, not gated): that is the unvectorised load, not a transpose (both operands are K-major in memory as
    in shared memory)."""
    fn = getattr(spec["fn"], "__name__", "") or spec["fn"].fn.__name__
    consts = spec["constexprs"]
    evens = [v for k, v in consts.items() if k.startswith("EVEN")]
    cin16 = "C_in" in (spec.get("divisible_by_16") or ())
    return fn.endswith("_fwd_kernel") and bool(consts.get("IS_SPIKE")) and (all(evens) or cin16)


def divisibility_attrs(spec):
    """ASTSource attrs marking the spec's 16-divisible arguments (default: every pointer argument)."""
    args = list(spec["fn"].arg_names)
    hinted = spec.get("divisible_by_16")
    if hinted is None:
        hinted = [a for a, t in spec["signature"].items() if t.startswith("*")]
    return {(args.index(a),): [["tt.divisibility", 16]] for a in hinted}


def compile_one(spec, arch, keep_dir=None):
    """Compile one spec for sm_<arch>; return a result row (dict) with resource usage and SASS counts, or the
    error. ``keep_dir``: also store the cubin there (as ``row["cubin"]``).

    Registers, stack and local bytes come from the cubin Triton built (cuobjdump); spill stores/loads
    from ``ptxas -v`` on the same PTX (a stack frame alone, e.g. for a call, is not a spill); shared
    memory is Triton's dynamic allocation plus any static shared memory.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn_name = getattr(spec["fn"], "__name__", "") or spec["fn"].fn.__name__
    config = spec["name"][len(fn_name):].strip("[]") if spec["name"].startswith(fn_name) else spec["name"]
    row = {"name": spec["name"], "kernel": fn_name, "config": config, "arch": arch,
           "num_warps": spec["num_warps"], "num_stages": spec["num_stages"], "ok": False,
           "cubin": cubin_name(spec["name"], arch)}
    try:
        source = ASTSource(spec["fn"], dict(spec["signature"]), dict(spec["constexprs"]), divisibility_attrs(spec))
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
        with tempfile.TemporaryDirectory() as tmp:
            cubin = pathlib.Path(tmp, "kernel.cubin")
            cubin.write_bytes(compiled.asm["cubin"])
            dump = subprocess.run([_nvidia_tool("cuobjdump"), "--dump-resource-usage", str(cubin)],
                                  capture_output=True, text=True, check=True).stdout
            sass = subprocess.run([_nvidia_tool("cuobjdump"), "-sass", str(cubin)],
                                  capture_output=True, text=True, check=True).stdout
            ptx = pathlib.Path(tmp, "kernel.ptx")
            ptx.write_text(compiled.asm["ptx"])
            ptxas = subprocess.run([_ptxas_for(arch), "-v", f"--gpu-name={_ptx_target(compiled.asm['ptx'])}",
                                    "-o", str(pathlib.Path(tmp, "check.cubin")), str(ptx)],
                                   capture_output=True, text=True, check=True)
        usage = parse_resource_usage(dump)
        spills = parse_ptxas_spills(ptxas.stdout + ptxas.stderr)
        counts = sass_counts(sass)
        if keep_dir is not None:
            target = pathlib.Path(keep_dir, row["cubin"])
            partial = target.with_suffix(".cubin.part")
            partial.write_bytes(compiled.asm["cubin"])
            os.replace(partial, target)
    except Exception as exc:
        message = str(exc).strip().splitlines()
        row["error"] = f"{type(exc).__name__}: {message[-1] if message else ''}"
        return row
    shared = int(compiled.metadata.shared) + usage["SHARED"]
    gemm = bool(re.search(r"\btt\.dot\b", compiled.asm.get("ttir", "")))
    row.update(registers=usage["REG"], regs=usage["REG"], stack=usage["STACK"], local=usage["LOCAL"],
               shared=shared, smem_bytes=shared, spill_bytes=spills["spill_stores"] + spills["spill_loads"],
               ctas_per_sm=ctas_per_sm(arch, usage["REG"], shared, spec["num_warps"]), gemm=gemm, **spills,
               **counts)
    limit = MAX_SHARED_BYTES.get(arch)
    if spills["spill_stores"] or spills["spill_loads"]:
        row["error"] = "spills"
    elif limit is not None and shared > limit:
        row["error"] = f"shared memory {shared} > {limit}"
    elif gemm and not counts["mma"]:
        row["error"] = "tl.dot without a tensor-core MMA instruction"
    elif is_int8_forward(spec) and counts["sts_u8"]:
        row["error"] = f"int8 forward byte-transposes an operand ({counts['sts_u8']} STS.U8)"
    else:
        row["ok"] = True
    return row


def _compile_task(task):
    _, index, arch, keep_dir = task
    package = _kernel_package()
    return compile_one(importlib.import_module(f"{package}.specs").compile_specs()[index][1], arch, keep_dir)


HEADER = (f"{'arch':<6} {'nw':>2} {'ns':>2} {'regs':>4} {'spill st/ld':>11} {'stack':>5} {'smem':>7} {'cta':>3} "
          f"{'mma':>4} {'ffma':>5} {'stsu8':>5} {'dep':>3}  status  kernel  mma-opcodes")


def format_row(row):
    if "registers" in row:
        depbar = "-" if row["depbar"] is None else row["depbar"]
        res = (f"{row['registers']:>4} {row['spill_stores']:>5}/{row['spill_loads']:<5} {row['stack']:>5} "
               f"{row['shared']:>7} {row['ctas_per_sm']:>3} {sum(row['mma'].values()):>4} {row['ffma']:>5} "
               f"{row['sts_u8']:>5} {depbar:>3}")
        ops = " ".join(f"{k}x{v}" for k, v in row["mma"].items())
    else:
        res = f"{'-':>4} {'-':>5}/{'-':<5} {'-':>5} {'-':>7} {'-':>3} {'-':>4} {'-':>5} {'-':>5} {'-':>3}"
        ops = ""
    status = "ok" if row["ok"] else f"FAIL ({row.get('error', '?')})"
    line = f"sm_{row['arch']:<3} {row['num_warps']:>2} {row['num_stages']:>2} {res}  {status}  {row['name']}"
    return f"{line}  {ops}" if ops else line


def ci_subset(specs):
    """For CI's time budget: per kernel and launch configuration (tile sizes, filter size, warps, stages), the
    first and the last of its specialisations (data path, dtypes, neuron flags: constexpr branches), in order.

    The full cross product (no --ci) is run by developers; its latest output is committed under
    benchmarks/results/.
    """
    groups = {}
    for module_name, index, spec in specs:
        fn = getattr(spec["fn"], "__name__", None) or spec["fn"].fn.__name__
        launch = tuple(sorted((k, str(v)) for k, v in spec["constexprs"].items()
                              if k.startswith("BLOCK") or k in ("KH", "KW")))
        groups.setdefault((module_name, fn, launch, spec["num_warps"], spec["num_stages"]), []).append(
            (module_name, index, spec))
    return [item for group in groups.values() for item in (group if len(group) <= 2 else (group[0], group[-1]))]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS), help="SM versions (80 90)")
    parser.add_argument("--module", nargs="+", default=None, help="only these kernels/<module>.py")
    parser.add_argument("--filter", default=None, help="only specs whose name contains this substring")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file (a list of objects)")
    parser.add_argument("--keep-cubins", default=None, metavar="DIR", help="store every compiled cubin in DIR")
    parser.add_argument("--ci", action="store_true",
                        help="every kernel x launch configuration, with the first and last of its specialisations")
    args = parser.parse_args(argv)

    specs, problems = collect_specs(args.module)
    if args.filter:
        specs = [s for s in specs if args.filter in s[2]["name"]]
    if args.ci:
        specs = ci_subset(specs)
    keep = args.keep_cubins
    if keep is not None:
        pathlib.Path(keep).mkdir(parents=True, exist_ok=True)
    tasks = [(module_name, index, arch, keep) for module_name, index, spec in specs for arch in args.arch
             if arch in spec.get("archs", args.arch)]

    print(HEADER)
    rows = []
    if args.jobs > 1 and len(tasks) > 1:
        with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
            for row in pool.map(_compile_task, tasks, chunksize=4):
                rows.append(row)
                print(format_row(row), flush=True)
    else:
        for _, _, spec in specs:
            for arch in (a for a in args.arch if a in spec.get("archs", args.arch)):
                row = compile_one(spec, arch, keep)
                rows.append(row)
                print(format_row(row), flush=True)

    failed = [r for r in rows if not r["ok"]]
    for problem in problems:
        print(f"ERROR: {problem}")
    print(f"\n{len(rows)} compiles ({len(specs)} specs x archs {'/'.join(map(str, args.arch))}, a per-arch "
          f"config for its arch only): "
          f"{len(rows) - len(failed)} ok, {len(failed)} failed; {len(problems)} spec/module problems")
    if args.json:
        target = pathlib.Path(args.json)
        partial = target.with_name(target.name + ".part")
        partial.write_text(json.dumps(rows, indent=1))
        os.replace(partial, target)
    return 1 if failed or problems or not rows else 0


if __name__ == "__main__":
    _ensure_not_interpreting()
    sys.exit(main())
