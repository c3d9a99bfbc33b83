"""Ahead-of-time compile report for every Triton kernel in kernels/ (no GPU needed).

Usage:
    python benchmarks/compile_report.py [--arch 80 90] [--filter SUBSTR] [--jobs N] [--json PATH]

Every module ``kernels/<name>.py`` that defines a ``@triton.jit`` function must export
``COMPILE_SPECS``, a list of dicts, one per config its launcher can use on a GPU:

    {"name": str,                 # unique, human readable, e.g. "lif_forward_kernel[fp16,hard=True]"
     "fn": <triton.jit function>,
     "signature": {arg: type},    # EVERY argument of fn: "*fp32", "*fp16", "*bf16", "*i8", "*u8", "*i16",
                                  # "*i32", "i32", "i64", "fp32", ... or "constexpr"
     "constexprs": {arg: value},  # a value for every argument typed "constexpr"
     "num_warps": int, "num_stages": int,
     "divisible_by_16": [arg, ...]}   # optional: args the launch sees 16-divisible (pointers: 16-byte aligned)

Triton's JIT specialises every pointer that is 16-byte aligned and every int argument divisible by 16
("tt.divisibility" = 16), which is what makes loads vectorise; an AOT compile must be told. Without
"divisible_by_16" a spec is compiled as a launch with all pointer arguments aligned (fresh torch tensors
are) and no int argument divisible by 16; list the int arguments (e.g. K) that real layer sizes make
divisible to compile the variant a real model launches.

Kernel entry points are named ``*_kernel``; a ``*_kernel`` function that no spec covers is an error
(helpers such as ``lif_step`` are only compiled inside the kernels that call them).

Each spec is compiled for each arch (sm_80, sm_90 by default) with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and the cubin is read with
``cuobjdump --dump-resource-usage`` and ``ptxas -v`` (both shipped in the triton wheel). One row per
spec x arch: registers, spill store/load bytes, stack frame bytes, shared memory (Triton's dynamic
allocation + static). The exit status is 1 when a module fails to import, a spec is malformed, a
compile fails, a config spills (ptxas spill stores or loads > 0) or needs more shared memory than the
arch offers; else 0.

TRITON_INTERPRET must be unset for compiling: if it is set, the script re-executes itself without it.
"""

import argparse
import concurrent.futures
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
SPEC_KEYS = {"name", "fn", "signature", "constexprs", "num_warps", "num_stages"}  # required; "divisible_by_16" optional


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
    """Return a list of problems with one COMPILE_SPECS entry (empty if fine)."""
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
    return problems


def collect_specs(module_filter=None):
    """Import every kernel module and gather its COMPILE_SPECS.

    Returns (specs, problems): specs is a list of (module_name, index, spec); problems a list of strings.
    """
    import triton

    package = _kernel_package()
    specs, problems = [], []
    for name in kernel_module_names():
        if module_filter and name not in module_filter:
            continue
        try:
            module = importlib.import_module(f"{package}.{name}")
        except Exception as exc:  # a broken module must show up in the report, not abort it
            problems.append(f"{name}: import failed: {type(exc).__name__}: {exc}")
            continue
        jit_fns = {k: v for k, v in vars(module).items()
                   if isinstance(v, triton.runtime.JITFunction) and v.__module__ == module.__name__}
        module_specs = getattr(module, "COMPILE_SPECS", None)
        if module_specs is None:
            if jit_fns:
                problems.append(f"{name}: defines @triton.jit functions but no COMPILE_SPECS")
            continue
        covered = set()
        for i, spec in enumerate(module_specs):
            spec_problems = _validate_spec(spec, name)
            problems.extend(spec_problems)
            if not spec_problems:
                specs.append((name, i, spec))
                covered.add(spec["fn"].__name__)
        for fn_name in sorted(jit_fns):
            if fn_name.endswith("_kernel") and fn_name not in covered:
                problems.append(f"{name}: kernel {fn_name} has no COMPILE_SPECS entry")
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


def divisibility_attrs(spec):
    """ASTSource attrs marking the spec's 16-divisible arguments (default: every pointer argument)."""
    args = list(spec["fn"].arg_names)
    hinted = spec.get("divisible_by_16")
    if hinted is None:
        hinted = [a for a, t in spec["signature"].items() if t.startswith("*")]
    return {(args.index(a),): [["tt.divisibility", 16]] for a in hinted}


def compile_one(spec, arch):
    """Compile one spec for sm_<arch>; return a result row (dict) with resource usage or the error.

    Registers, stack and local bytes come from the cubin Triton built (cuobjdump); spill stores/loads
    from ``ptxas -v`` on the same PTX (a stack frame alone, e.g. for a call, is not a spill); shared
    memory is Triton's dynamic allocation plus any static shared memory.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = {"name": spec["name"], "arch": f"sm_{arch}", "num_warps": spec["num_warps"],
           "num_stages": spec["num_stages"], "ok": False}
    try:
        source = ASTSource(spec["fn"], dict(spec["signature"]), dict(spec["constexprs"]), divisibility_attrs(spec))
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
        with tempfile.TemporaryDirectory() as tmp:
            cubin = pathlib.Path(tmp, "kernel.cubin")
            cubin.write_bytes(compiled.asm["cubin"])
            dump = subprocess.run([_nvidia_tool("cuobjdump"), "--dump-resource-usage", str(cubin)],
                                  capture_output=True, text=True, check=True).stdout
            ptx = pathlib.Path(tmp, "kernel.ptx")
            ptx.write_text(compiled.asm["ptx"])
            ptxas = subprocess.run([_ptxas_for(arch), "-v", f"--gpu-name={_ptx_target(compiled.asm['ptx'])}",
                                    "-o", str(pathlib.Path(tmp, "check.cubin")), str(ptx)],
                                   capture_output=True, text=True, check=True)
        usage = parse_resource_usage(dump)
        spills = parse_ptxas_spills(ptxas.stdout + ptxas.stderr)
    except Exception as exc:
        message = str(exc).strip().splitlines()
        row["error"] = f"{type(exc).__name__}: {message[-1] if message else ''}"
        return row
    shared = int(compiled.metadata.shared) + usage["SHARED"]
    row.update(registers=usage["REG"], stack=usage["STACK"], local=usage["LOCAL"], shared=shared, **spills)
    limit = MAX_SHARED_BYTES.get(arch)
    if spills["spill_stores"] or spills["spill_loads"]:
        row["error"] = "spills"
    elif limit is not None and shared > limit:
        row["error"] = f"shared memory {shared} > {limit}"
    else:
        row["ok"] = True
    return row


def _compile_task(task):
    module_name, index, arch = task
    package = _kernel_package()
    module = importlib.import_module(f"{package}.{module_name}")
    return compile_one(module.COMPILE_SPECS[index], arch)


def format_row(row):
    if "registers" in row:
        res = (f"{row['registers']:>4} {row['spill_stores']:>5}/{row['spill_loads']:<5} {row['stack']:>5} "
               f"{row['shared']:>7}")
    else:
        res = f"{'-':>4} {'-':>5}/{'-':<5} {'-':>5} {'-':>7}"
    status = "ok" if row["ok"] else f"FAIL ({row.get('error', '?')})"
    return f"{row['arch']:<6} {row['num_warps']:>2} {row['num_stages']:>2} {res}  {status}  {row['name']}"


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
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--ci", action="store_true",
                        help="every kernel x launch configuration, with the first and last of its specialisations")
    args = parser.parse_args(argv)

    specs, problems = collect_specs(args.module)
    if args.filter:
        specs = [s for s in specs if args.filter in s[2]["name"]]
    if args.ci:
        specs = ci_subset(specs)
    tasks = [(module_name, index, arch) for module_name, index, _ in specs for arch in args.arch]

    print(f"{'arch':<6} {'nw':>2} {'ns':>2} {'regs':>4} {'spill st/ld':>11} {'stack':>5} {'smem':>7}  status  kernel")
    rows = []
    if args.jobs > 1 and len(tasks) > 1:
        with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
            for row in pool.map(_compile_task, tasks, chunksize=4):
                rows.append(row)
                print(format_row(row), flush=True)
    else:
        for _, _, spec in specs:
            for arch in args.arch:
                row = compile_one(spec, arch)
                rows.append(row)
                print(format_row(row), flush=True)

    failed = [r for r in rows if not r["ok"]]
    for problem in problems:
        print(f"ERROR: {problem}")
    print(f"\n{len(rows)} compiles ({len(specs)} specs x {len(args.arch)} archs): "
          f"{len(rows) - len(failed)} ok, {len(failed)} failed; {len(problems)} spec/module problems")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"rows": rows, "problems": problems}, indent=1))
    return 1 if failed or problems or not rows else 0


if __name__ == "__main__":
    _ensure_not_interpreting()
    sys.exit(main())
