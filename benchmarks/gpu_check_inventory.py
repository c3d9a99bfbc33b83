"""What the Triton JIT really built: registers, spills, shared memory, warps, stages and SASS instruction counts of
every compiled kernel, beside what benchmarks/compile_report.py predicts for the same spec.

Read from Triton's compiled-kernel objects (``JITFunction.device_caches[device][0]`` maps a specialisation key to
a ``CompiledKernel``): ``metadata`` (``name``, ``num_warps``, ``num_stages``, ``shared``), ``n_regs`` /
``n_spills`` (set once the kernel was loaded on the device), ``src.constants`` (the constexpr values) and
``asm["cubin"]``, disassembled with the ``cuobjdump`` shipped in the Triton wheel. Nothing here needs a GPU:
`inventory_of_compiled` takes any object with those attributes, e.g. one from ``triton.compile``.
"""
from __future__ import annotations

import collections
import importlib
import pathlib
import re
import subprocess
import sys
import tempfile
from typing import Dict, Iterable, List, Optional

ROOT = pathlib.Path(__file__).resolve().parents[1]
# SASS opcode families counted per kernel: tensor-core MMAs (HMMA: fp16/bf16 mma.sync, HGMMA: Hopper wgmma,
# IMMA/IGMMA: int8), fp32 FMAs, and byte stores to shared memory (the int8 operand staging).
OPCODES = ("HMMA", "HGMMA", "IMMA", "IGMMA", "FFMA", "STS.U8")
_SASS_LINE = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")


def sass_counts(sass: str) -> Dict[str, int]:
    """Counts of the `OPCODES` families in a SASS listing (``cuobjdump -sass``): ``HMMA`` counts every
    ``HMMA.*``; ``STS.U8`` only byte stores."""
    counts = collections.Counter()
    for line in sass.splitlines():
        m = _SASS_LINE.match(line)
        if not m:
            continue
        op = m.group(1)
        base = op.split(".")[0]
        if base in OPCODES:
            counts[base] += 1
        if op.startswith("STS.U8"):
            counts["STS.U8"] += 1
    return {k: counts.get(k, 0) for k in OPCODES}


def _cuobjdump() -> str:
    sys.path.insert(0, str(ROOT))
    from benchmarks.compile_report import _nvidia_tool
    return _nvidia_tool("cuobjdump")


def cubin_facts(cubin: bytes) -> dict:
    """``{"regs", "stack", "local", "static_shared", "sass": {opcode: count}}`` of one cubin (cuobjdump)."""
    from benchmarks.compile_report import parse_resource_usage
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp, "k.cubin")
        path.write_bytes(cubin)
        tool = _cuobjdump()
        usage = parse_resource_usage(subprocess.run([tool, "--dump-resource-usage", str(path)], capture_output=True,
                                                    text=True, check=True, timeout=60).stdout)
        sass = subprocess.run([tool, "-sass", str(path)], capture_output=True, text=True, check=True,
                              timeout=120).stdout
    return {"regs": usage["REG"], "stack": usage["STACK"], "local": usage["LOCAL"], "static_shared": usage["SHARED"],
            "sass": sass_counts(sass)}


def _constexprs(fn, compiled) -> dict:
    src = getattr(compiled, "src", None)
    constants = getattr(src, "constants", None) or {}
    names = list(getattr(fn, "arg_names", []))
    out = {}
    for key, value in constants.items():
        idx = key[0] if isinstance(key, tuple) and len(key) == 1 else key
        if isinstance(idx, int) and idx < len(names):
            out[names[idx]] = value if isinstance(value, (bool, int, float, str)) or value is None else str(value)
    return out


def inventory_of_compiled(fn_name: str, compiled, fn=None) -> dict:
    """One inventory row of a compiled kernel (see the module docstring for what is read)."""
    md = compiled.metadata
    row = {"kernel": fn_name, "name": getattr(md, "name", fn_name), "num_warps": getattr(md, "num_warps", None),
           "num_stages": getattr(md, "num_stages", None), "dyn_shared": getattr(md, "shared", None),
           "n_regs": getattr(compiled, "n_regs", None), "n_spills": getattr(compiled, "n_spills", None),
           "constexprs": _constexprs(fn, compiled) if fn is not None else {}}
    target = getattr(md, "target", None)
    row["arch"] = f"sm_{target.arch}" if getattr(target, "arch", None) is not None else None
    try:
        row.update(cubin_facts(compiled.asm["cubin"]))
        row["smem_bytes"] = (row["dyn_shared"] or 0) + row["static_shared"]
    except Exception as exc:  # recorded, not fatal: the rest of the inventory still comes back
        row["error"] = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
    return row


def jit_functions(package: str = "binwslt.kernels") -> List[tuple]:
    """``[(module_name, fn_name, JITFunction)]`` of every ``@triton.jit`` function in the kernel package."""
    import triton
    pkg = importlib.import_module(package)
    jit_function = importlib.import_module(f"{package}.optional").jit_function  # under @triton.heuristics
    found = []
    for path in sorted(pathlib.Path(pkg.__file__).parent.glob("*.py")):
        if path.stem == "__init__":
            continue
        try:
            module = importlib.import_module(f"{package}.{path.stem}")
        except Exception:
            continue
        for name, obj in vars(module).items():
            value = jit_function(obj)
            if isinstance(value, triton.runtime.JITFunction) and value.__module__ == module.__name__:
                found.append((path.stem, name, value))
    return found


def compiled_kernels(package: str = "binwslt.kernels") -> Iterable[tuple]:
    """``(module, fn_name, fn, CompiledKernel)`` for every kernel the JIT compiled in this process."""
    for module, name, fn in jit_functions(package):
        for cache in getattr(fn, "device_caches", {}).values():
            kernel_cache = cache[0] if isinstance(cache, tuple) else cache
            for compiled in list(getattr(kernel_cache, "values", lambda: [])()):
                if hasattr(compiled, "result"):  # an async compile's future
                    compiled = compiled.result()
                yield module, name, fn, compiled


def matching_spec(row: dict, specs) -> Optional[dict]:
    """The compile-report spec (benchmarks/compile_report.collect_specs) of the same kernel, warps, stages and
    constexpr values as an inventory row, or None."""
    for _module, _index, spec in specs:
        if spec["fn"].__name__ != row["kernel"]:
            continue
        if spec["num_warps"] != row["num_warps"] or spec["num_stages"] != row["num_stages"]:
            continue
        if all(row["constexprs"].get(k) == v for k, v in spec["constexprs"].items()):
            return spec
    return None


def predicted(spec: dict, arch: int) -> dict:
    """compile_report's row for ``spec`` on sm_<arch>, normalised to regs / spill_bytes / smem_bytes / mma (the
    report's ``--json`` keys; older rows say registers / spill_stores+spill_loads / shared)."""
    from benchmarks.compile_report import compile_one
    row = compile_one(spec, arch)
    spill = row.get("spill_bytes")
    if spill is None and "spill_stores" in row:
        spill = row["spill_stores"] + row["spill_loads"]
    return {"spec": spec["name"], "ok": row.get("ok"), "error": row.get("error"),
            "regs": row.get("regs", row.get("registers")), "spill_bytes": spill,
            "smem_bytes": row.get("smem_bytes", row.get("shared")), "mma": row.get("mma"), "ffma": row.get("ffma"),
            "sts_u8": row.get("sts_u8")}
