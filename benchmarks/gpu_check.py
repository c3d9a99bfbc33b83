"""The phases of the one-command GPU check (benchmarks/gpu_check.sh runs them in order, each with its deadline).

    python benchmarks/gpu_check.py env|correctness|kernels|summary --out DIR --deadline EPOCH_S [--dry-run]

- ``env``: ``env.json``: GPU name, SM count, memory, clocks, driver, torch/CUDA/cuDNN/Triton versions, TF32 flags.
- ``correctness``: ``correctness.json``: `CASES` (every kernel path) on backend="triton" in fp32 on the GPU
  against backend="reference" on the CPU in float64: spikes and every gradient, compared by
  benchmarks/gpu_check_compare.py (dyadic cases: identical spikes, gradients at rtol 1e-4; general cases: the
  neurons whose spikes differ masked, their share bounded).
- ``kernels``: ``kernels.json``: VGG-11's distinct layers at T=4, N=128 with training BatchNorm: one training step
  of triton, the torch backend, SpikingJelly and the floors (bare cuDNN conv forward+backward in fp32, TF32 and
  bf16; an int8 ``torch._int_mm`` GEMM of the layer's im2col size), timed side by side, the device time of each
  kernel from torch.profiler; then the JIT inventory of every Triton kernel that ran beside compile_report's
  prediction for the same spec (benchmarks/gpu_check_inventory.py).
- ``summary``: ``summary.md`` from whatever files exist (a cut-off phase leaves its finished cases).

Every phase rewrites its file atomically after each case and starts no case after its deadline (the cases left
are listed as skipped). ``--dry-run``: the same phases on the CPU with Triton's interpreter and tiny shapes.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional

ROOT = pathlib.Path(__file__).resolve().parents[1]
FILES = ("env.json", "install.log", "correctness.json", "kernels.json", "tests.log", "bench.json", "summary.md")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_json(path: pathlib.Path, obj) -> None:
    """Atomic JSON write (binwslt.train.atomic_write_bytes): a cut-off never leaves half a file."""
    from binwslt.train import atomic_write_bytes
    data = (json.dumps(obj, indent=1, default=str) + "\n").encode()
    atomic_write_bytes(str(path), lambda f: f.write(data))


def _error(exc: BaseException) -> str:
    return traceback.format_exception_only(type(exc), exc)[-1].strip()[:500]


def _setup(dry_run: bool) -> None:
    """Interpreter on for the dry run (before any kernel module is imported), off on the GPU; the working tree's
    binwslt (benchmarks/run.py's rule)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.run import _use_working_tree
    _use_working_tree("cpu" if dry_run else "cuda")


def _device(dry_run: bool) -> str:
    import torch
    if dry_run:
        return "cpu"
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: torch sees no CUDA device (use --dry-run on a CPU machine)")
    return "cuda"


# ------------------------------------------------------------------------------------------------------- env
def _nvidia_smi() -> dict:
    fields = ("name", "driver_version", "clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem",
              "power.draw", "power.limit", "temperature.gpu", "memory.total", "memory.used", "pstate")
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except Exception as exc:
        return {"error": _error(exc)}
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout).strip()[:300]}
    return {"gpus": [dict(zip(fields, (v.strip() for v in line.split(","))))
                     for line in out.stdout.strip().splitlines()]}


def environment(dry_run: bool) -> dict:
    """What ran where: versions, GPU properties, clocks, TF32 flags, git commit."""
    import torch
    from benchmarks.peers import PEERS, peer_version
    env = {"date_utc": _now(), "dry_run": dry_run, "python": platform.python_version(),
           "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
           "versions": {p: peer_version(p) for p in PEERS + ("triton", "numpy", "loguru")},
           "triton_interpret": os.environ.get("TRITON_INTERPRET"),
           "tf32": {"cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                    "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                    "float32_matmul_precision": torch.get_float32_matmul_precision()}}
    import binwslt
    env["binwslt"] = {"version": getattr(binwslt, "__version__", None), "file": binwslt.__file__}
    try:
        env["git_commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                           capture_output=True, text=True, timeout=10).stdout.strip() or None
    except Exception:
        env["git_commit"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "sm_count": p.multi_processor_count,
                      "total_memory_gib": round(p.total_memory / 2 ** 30, 1),
                      "l2_cache_mib": round(getattr(p, "L2_cache_size", 0) / 2 ** 20, 1)}
        env["nvidia_smi"] = _nvidia_smi()
    return env


# ----------------------------------------------------------------------------------------------- correctness
@dataclasses.dataclass(frozen=True)
class Case:
    """One correctness case: ``op`` "conv", "linear" or "lif"; ``geo`` full size and ``tiny`` (dry run):
    conv (T, N, C_in, C_out, H, W, k, stride, padding), linear (T, N, K, C), lif (T, N, C, H, W); ``kind`` of x
    "spike", "analog" or "direct"; ``dyadic``: every current exact in fp32, so spikes must be bit-identical."""
    name: str
    covers: str
    op: str
    geo: tuple
    tiny: tuple
    kind: str = "spike"
    dyadic: bool = False
    bn: bool = False
    residual: bool = False
    neuron: tuple = ()  # LIFConfig keyword pairs

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CASES = (
    Case("direct-3-64-bn", "direct first layer (analog image, conv once), training BN + running stats", "conv",
         (4, 16, 3, 64, 32, 32, 3, 1, 1), (2, 2, 3, 16, 6, 6, 3, 1, 1), kind="direct", bn=True),
    Case("64-64-32x32-bigtile-bn", "64->64 at 32x32, N*H*W > 65536 rows: the largest forward tile; training BN",
         "conv", (4, 72, 64, 64, 32, 32, 3, 1, 1), (2, 2, 16, 16, 6, 6, 3, 1, 1), bn=True),
    Case("512-512-4x4-deep-bn", "deep 512->512 at 4x4 (long K loop, few rows), training BN", "conv",
         (4, 32, 512, 512, 4, 4, 3, 1, 1), (2, 2, 32, 32, 3, 3, 3, 1, 1), bn=True),
    Case("128-256-s2", "stride 2, scale/shift epilogue", "conv",
         (4, 16, 128, 256, 16, 16, 3, 2, 1), (2, 2, 16, 32, 6, 6, 3, 2, 1)),
    Case("64-64-residual", "spiking conv with an analog residual", "conv",
         (4, 16, 64, 64, 16, 16, 3, 1, 1), (2, 2, 16, 16, 5, 5, 3, 1, 1), residual=True),
    Case("odd-19-37", "channel counts that are not tile multiples (masked tails), 9x9", "conv",
         (3, 8, 19, 37, 9, 9, 3, 1, 1), (2, 1, 5, 7, 5, 5, 3, 1, 1), neuron=(("v_reset", None),)),
    Case("analog-conv", "analog (non-spike) time-major conv input, 1x1 kernel", "conv",
         (3, 8, 48, 32, 8, 8, 1, 1, 0), (2, 1, 8, 8, 4, 4, 1, 1, 0), kind="analog"),
    Case("spike-linear-8192-256-bn", "spike linear (CONV-4's fc 8192->256), training BN", "linear",
         (4, 128, 8192, 256), (2, 4, 64, 32), bn=True),
    Case("analog-linear-odd", "analog linear with odd sizes, residual", "linear",
         (4, 16, 300, 100), (2, 3, 20, 12), kind="analog", residual=True),
    Case("lif-large-triangle", "the standalone LIF kernel, triangle surrogate, soft reset", "lif",
         (4, 128, 64, 16, 16), (3, 2, 4, 3, 3), neuron=(("surrogate", "triangle"), ("v_reset", None))),
    Case("dyadic-conv-64-64", "dyadic conv, tile-multiple channels, BN off: bit-identical", "conv",
         (4, 8, 64, 64, 8, 8, 3, 1, 1), (2, 1, 16, 16, 4, 4, 3, 1, 1), dyadic=True, neuron=(("decay", 0.5),)),
    Case("dyadic-conv-odd-s2-res", "dyadic conv, odd channels, stride 2, residual, soft reset, decay_input",
         "conv", (3, 4, 5, 19, 9, 9, 3, 2, 0), (2, 1, 5, 7, 7, 7, 3, 2, 0), dyadic=True, residual=True,
         neuron=(("decay", 0.5), ("v_reset", None), ("decay_input", True), ("threshold", 0.25))),
    Case("dyadic-direct", "dyadic direct-encoded first layer", "conv",
         (4, 4, 3, 32, 16, 16, 3, 1, 1), (2, 1, 3, 16, 5, 5, 3, 1, 1), kind="direct", dyadic=True,
         neuron=(("decay", 0.75),)),
    Case("dyadic-linear-spike-res", "dyadic spike linear with residual", "linear",
         (4, 32, 512, 96), (2, 2, 32, 24), dyadic=True, residual=True, neuron=(("decay", 0.75),)),
    Case("dyadic-linear-analog", "dyadic analog linear", "linear",
         (3, 16, 96, 64), (2, 2, 16, 16), kind="analog", dyadic=True, neuron=(("decay", 0.5),)),
)


def case_inputs(case: Case, tiny: bool, seed: int = 0):
    """``(x, weight, scores, kw)`` on the CPU in float32 for one case (weight/scores None for "lif")."""
    import torch
    from binwslt.config import LIFConfig
    from binwslt.spikes import mark_spikes
    g = torch.Generator().manual_seed(seed)
    geo = case.tiny if tiny else case.geo

    def rnd(*shape, scale=1.0):
        return torch.randn(shape, generator=g) * scale

    def dyad(t):
        return torch.round(t * 8.0) / 8.0 if case.dyadic else t

    neuron = LIFConfig(**dict(case.neuron))
    if case.op == "lif":
        return rnd(*geo) + 0.5, None, None, dict(neuron=neuron)
    if case.op == "conv":
        T, N, C_in, C_out, H, W, k, stride, padding = geo
        w_shape, x_tail = (C_out, C_in, k, k), (C_in, H, W)
        oh, ow = (H + 2 * padding - k) // stride + 1, (W + 2 * padding - k) // stride + 1
        out_tail = (C_out, oh, ow)
        kw = dict(stride=stride, padding=padding)
    else:
        T, N, C_in, C_out = geo
        w_shape, x_tail, out_tail, kw = (C_out, C_in), (C_in,), (C_out,), {}
    if case.kind == "direct":
        x = dyad(rnd(N, *x_tail))
        kw["timesteps"] = T
    elif case.kind == "analog":
        x = dyad(rnd(T, N, *x_tail).relu())
    else:
        x = mark_spikes((torch.rand((T, N) + x_tail, generator=g) < 0.2).float())
    fan_in = 1
    for d in w_shape[1:]:
        fan_in *= d
    if case.dyadic:  # |w| all equal: alpha = 0.25 exactly, every current a multiple of 1/32
        weight = torch.where(torch.rand(w_shape, generator=g) < 0.5, -0.25, 0.25)
        kw["scale"] = 1.0 + torch.randint(-2, 3, (C_out,), generator=g).float() / 8.0
        kw["shift"] = 0.25 + torch.randint(-2, 3, (C_out,), generator=g).float() / 8.0
    else:
        weight = rnd(*w_shape, scale=(2.0 / fan_in) ** 0.5)
        kw["scale"] = 1.0 + rnd(C_out, scale=0.2)
        kw["shift"] = 0.5 + rnd(C_out, scale=0.2)
    scores = rnd(*w_shape)
    if case.residual:
        kw["residual"] = dyad(rnd(T, N, *out_tail, scale=0.5))
    if case.bn:
        kw.update(batch_norm=True, running_mean=rnd(C_out, scale=0.1), running_var=rnd(C_out, scale=0.1).abs() + 1)
    kw["neuron"] = neuron
    return x, weight, scores, kw


def _run_lif(backend, x, kw, device, dtype):
    from benchmarks.gpu_check_compare import move
    from binwslt import functional as Fn
    leaf = move(x, device, dtype).requires_grad_(True)
    return Fn.lif(leaf, kw["neuron"], backend=backend), {"x": leaf}, {}


def check_case(case: Case, device: str, tiny: bool) -> dict:
    """Run one case on triton (``device``, fp32) and on the reference (CPU, float64); the comparison as a dict."""
    import torch
    from benchmarks.gpu_check_compare import DYADIC_TOL, GENERAL_TOL, compare, run_forward
    x, weight, scores, kw = case_inputs(case, tiny)
    t0 = time.perf_counter()
    if case.op == "lif":
        want = _run_lif("reference", x, kw, "cpu", torch.float64)
        got = _run_lif("triton", x, kw, device, None)
    else:
        op = "binw_conv2d_lif" if case.op == "conv" else "binw_linear_lif"
        want = run_forward(op, "reference", x, weight, scores, 0.4, kw, device="cpu", dtype=torch.float64)
        got = run_forward(op, "triton", x, weight, scores, 0.4, kw, device=device)
    tol = DYADIC_TOL if case.dyadic else GENERAL_TOL
    result = compare(got, want, exact=case.dyadic, **tol)
    if device == "cuda":
        torch.cuda.synchronize()
    out = result.to_dict()
    if not 0.02 < out["firing_rate"] < 0.98:  # a silent or saturated layer would compare nothing
        out["failures"] = list(out["failures"]) + [f"degenerate input: firing rate {out['firing_rate']:.3f}"]
        out["ok"] = False
    out["seconds"] = round(time.perf_counter() - t0, 3)
    out["worst_grad_max_rel_err"] = max((g["max_rel_err"] for g in out["grads"].values()), default=None)
    return out


def phase_correctness(out_dir: pathlib.Path, deadline: float, dry_run: bool) -> int:
    device = _device(dry_run)
    import torch
    from benchmarks.gpu_check_compare import DYADIC_TOL, GENERAL_TOL
    torch.backends.cudnn.allow_tf32 = False  # nothing of the oracle runs on the GPU; set anyway
    torch.backends.cuda.matmul.allow_tf32 = False
    doc = {"started_utc": _now(), "status": "running", "device": device, "dry_run": dry_run,
           "oracle": "backend='reference' on the CPU in float64", "tested": "backend='triton' in float32",
           "tolerances": {"general": GENERAL_TOL, "dyadic": DYADIC_TOL}, "cases": []}
    path = out_dir / "correctness.json"
    failed = 0
    write_json(path, doc)
    for case in CASES:
        entry = {"case": case.to_dict()}
        if time.time() > deadline:
            entry.update(status="skipped", reason="phase deadline reached")
        else:
            try:
                entry.update(check_case(case, device, dry_run))
                entry["status"] = "ok" if entry["ok"] else "failed"
            except Exception as exc:
                entry.update(status="error", reason=_error(exc))
        failed += entry["status"] in ("failed", "error")
        doc["cases"].append(entry)
        print(f"[correctness] {case.name}: {entry['status']} {'; '.join(entry.get('failures', [])) or ''}"
              f"{entry.get('reason', '')}", flush=True)
        write_json(path, doc)
    doc["status"] = "complete"
    doc["finished_utc"] = _now()
    write_json(path, doc)
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------------- kernels
def _im2col_gemm(shape, timesteps: int, batch: int, device: str):
    """The int8 ``torch._int_mm`` floor: one ``[M, K] x [K, N]`` GEMM, M = frames x output pixels, K = C_in*k*k,
    N = C_out (K and N padded up to multiples of 8, as _int_mm needs). Returns a zero-argument callable."""
    import torch
    oh, ow = shape.out_hw
    frames = batch if shape.direct else timesteps * batch
    m = frames * oh * ow
    k = -(-(shape.in_channels * shape.kernel * shape.kernel) // 8) * 8
    n = -(-shape.out_channels // 8) * 8
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-1, 2, (m, k), generator=g, dtype=torch.int8).to(device)
    b = torch.randint(-1, 2, (k, n), generator=g, dtype=torch.int8).to(device)

    def run():
        torch._int_mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
    return run, {"M": m, "K": k, "N": n}


class _TF32:
    """Context: cuDNN/cuBLAS TF32 on or off (restored after)."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        import torch
        self.saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = self.on

    def __exit__(self, *exc):
        import torch
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.saved


def _with_tf32(fn: Callable[[], None], on: bool) -> Callable[[], None]:
    def run():
        with _TF32(on):
            fn()
    return run


def layer_steps(case, device: str) -> Dict[str, Callable[[], None]]:
    """``{impl: one training step}`` for one layer case; an impl that cannot run maps to its reason (str)."""
    import torch
    from benchmarks import cases
    steps: Dict[str, object] = {}
    for impl in ("triton", "torch", "spikingjelly"):
        try:
            steps[impl] = _with_tf32(cases.layer_runner(impl, case, device).train_step, False)
        except Exception as exc:
            steps[impl] = _error(exc)
    for name, dtype, tf32 in (("floor_fp32", torch.float32, False), ("floor_tf32", torch.float32, True),
                              ("floor_bf16", torch.bfloat16, False)):
        try:
            steps[name] = _with_tf32(cases.layer_runner("floor", case, device, dtype).train_step, tf32)
        except Exception as exc:
            steps[name] = _error(exc)
    try:
        steps["int8_mm"], _ = _im2col_gemm(case.shape, case.timesteps, case.batch, device)
    except Exception as exc:
        steps["int8_mm"] = _error(exc)
    return steps


def device_kernel_times(fn: Callable[[], None], device: str, top: int = 8) -> List[dict]:
    """The kernels of one call of ``fn`` by device time (torch.profiler; CPU time on a CPU): name, calls, us."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CUDA] if device == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        fn()
    rows = []
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None) if device == "cuda" else ev.self_cpu_time_total
        if us is None:
            us = getattr(ev, "cuda_time_total", 0)
        if us and us > 0:
            rows.append({"kernel": ev.key[:160], "calls": ev.count, "us": round(float(us), 1)})
    rows.sort(key=lambda r: -r["us"])
    return rows[:top]


def kernel_layer_cases(dry_run: bool):
    from benchmarks import shapes
    if dry_run:
        return [shapes.LayerCase(s, 2, 2) for s in shapes.QUICK_LAYERS[:2]]
    return [shapes.LayerCase(s, 4, 128) for s in shapes.distinct(shapes.model_layer_shapes("vgg11"))]


def inventory(deadline: float, arch: Optional[int]) -> dict:
    """The JIT inventory of this process's compiled Triton kernels with compile_report's prediction each."""
    from benchmarks import compile_report
    from benchmarks.gpu_check_inventory import compiled_kernels, inventory_of_compiled, matching_spec, predicted
    specs, problems = compile_report.collect_specs()
    rows = []
    for module, name, fn, compiled in compiled_kernels():
        row = inventory_of_compiled(name, compiled, fn)
        row["module"] = module
        spec = matching_spec(row, specs)
        if spec is None:
            row["predicted"] = {"error": "no compile_report spec with these constexprs, warps and stages"}
        elif time.time() > deadline:
            row["predicted"] = {"spec": spec["name"], "error": "phase deadline reached before compiling it"}
        else:
            row["predicted"] = predicted(spec, arch or 90)
        rows.append(row)
    return {"rows": rows, "spec_problems": problems}


def phase_kernels(out_dir: pathlib.Path, deadline: float, dry_run: bool) -> int:
    import torch
    from benchmarks import timing
    device = _device(dry_run)
    path = out_dir / "kernels.json"
    doc = {"started_utc": _now(), "status": "running", "device": device, "dry_run": dry_run,
           "step": "one training step (forward + backward of a fixed output gradient), training BatchNorm",
           "layers": [], "inventory": None}
    write_json(path, doc)  # a cut-off in the first case still leaves the file
    # a quarter of the phase for the inventory (its predictions compile AOT)
    layer_deadline = time.time() + 0.75 * max(0.0, deadline - time.time())
    settings = dict(rounds=3, warmup=1, budget_s=0.5) if dry_run else dict(rounds=15, warmup=3, budget_s=2.0)
    for case in kernel_layer_cases(dry_run):
        entry = {"label": case.label, "shape": case.shape.to_dict(), "timesteps": case.timesteps,
                 "batch": case.batch}
        if time.time() > layer_deadline:
            entry["status"] = "skipped: phase deadline reached"
        else:
            try:
                steps = layer_steps(case, device)
                entry["unavailable"] = {k: v for k, v in steps.items() if isinstance(v, str)}
                runnable = {k: v for k, v in steps.items() if not isinstance(v, str)}
                if dry_run:
                    runnable.pop("triton", None)  # interpreted: it ran (proved below), never timed
                if "triton" in steps and not isinstance(steps["triton"], str):
                    steps["triton"]()  # first call compiles (or proves the interpreter path runs)
                    entry["triton_ran"] = "untimed, interpreter" if dry_run else "compiled"
                seconds = timing.interleaved(runnable, **settings)
                entry["step_ms"] = {k: timing.summary(v) for k, v in seconds.items()}
                entry["kernels"] = {k: device_kernel_times(fn, device) for k, fn in runnable.items()}
                entry["status"] = "ok"
            except Exception as exc:
                entry["status"] = f"error: {_error(exc)}"
            torch.cuda.empty_cache() if device == "cuda" else None
        doc["layers"].append(entry)
        print(f"[kernels] {case.label}: {entry['status']}", flush=True)
        write_json(path, doc)
    try:
        if dry_run:
            doc["inventory"] = _aot_inventory(deadline)
        else:
            arch = torch.cuda.get_device_capability()
            doc["inventory"] = inventory(deadline, arch[0] * 10 + arch[1])
    except Exception as exc:
        doc["inventory"] = {"error": _error(exc)}
    doc["status"] = "complete"
    doc["finished_utc"] = _now()
    write_json(path, doc)
    return 0


def _aot_inventory(deadline: float) -> dict:
    """Dry run: no kernel is compiled under the interpreter, so one spec is compiled ahead of time for sm_90 (no
    GPU needed) in a child without TRITON_INTERPRET, and read by the same inventory code."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    timeout = max(10.0, deadline - time.time())
    proc = subprocess.run([sys.executable, str(pathlib.Path(__file__)), "aot-inventory"], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=timeout)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip()[-500:]}
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    doc["note"] = "dry run: one spec compiled ahead of time for sm_90 stands in for the JIT's kernels"
    return doc


def aot_inventory_main() -> int:
    sys.path.insert(0, str(ROOT))
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from benchmarks import compile_report
    from benchmarks.gpu_check_inventory import inventory_of_compiled, matching_spec, predicted
    specs, problems = compile_report.collect_specs(["lif"])
    _, _, spec = specs[0]
    src = ASTSource(spec["fn"], dict(spec["signature"]), dict(spec["constexprs"]),
                    compile_report.divisibility_attrs(spec))
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
    row = inventory_of_compiled(spec["fn"].__name__, compiled, spec["fn"])
    row["module"] = "lif"
    match = matching_spec(row, specs)
    row["predicted"] = predicted(match, 90) if match is not None else {"error": "no matching spec"}
    print(json.dumps({"rows": [row], "spec_problems": problems}, default=str))
    return 0


# ---------------------------------------------------------------------------------------------------- summary
def _load(path: pathlib.Path):
    try:
        return json.loads(path.read_text())
    except Exception:
        return None


def _fmt(v, spec=".3g"):
    return "-" if v is None else format(v, spec)


def summary_markdown(out_dir: pathlib.Path) -> str:
    """The tables a person reads first, from whatever files the phases left in ``out_dir``."""
    lines = ["# binwslt GPU check", ""]
    env = _load(out_dir / "env.json") or {}
    gpu = env.get("gpu", {})
    smi = (env.get("nvidia_smi") or {}).get("gpus", [{}])[0]
    lines += [f"- date {env.get('date_utc', '?')}, commit {env.get('git_commit', '?')}, "
              f"{'DRY RUN (CPU, Triton interpreter, tiny shapes)' if env.get('dry_run') else 'GPU run'}",
              f"- GPU {gpu.get('name', '-')} (sm {gpu.get('capability', '-')}, {gpu.get('sm_count', '-')} SMs), "
              f"driver {smi.get('driver_version', '-')}, SM clock {smi.get('clocks.sm', '-')} "
              f"(max {smi.get('clocks.max.sm', '-')})",
              f"- torch {env.get('torch', '?')} (CUDA {env.get('torch_cuda')}, cuDNN {env.get('cudnn')}), "
              f"triton {(env.get('versions') or {}).get('triton')}, TF32 {env.get('tf32')}", ""]
    corr = _load(out_dir / "correctness.json")
    lines += ["## Correctness: triton (fp32) vs reference (CPU, float64)", ""]
    if corr is None:
        lines += ["correctness.json missing or unreadable", ""]
    else:
        lines += [f"status: {corr.get('status')}", "",
                  "| case | dyadic | status | spike mismatch | neuron mismatch | worst grad max rel err | s |",
                  "|---|---|---|---|---|---|---|"]
        for c in corr.get("cases", []):
            lines.append(f"| {c['case']['name']} | {c['case']['dyadic']} | {c['status']} | "
                         f"{_fmt(c.get('spike_mismatch'))} | {_fmt(c.get('neuron_mismatch'))} | "
                         f"{_fmt(c.get('worst_grad_max_rel_err'))} | {_fmt(c.get('seconds'))} |")
        bad = [c for c in corr.get("cases", []) if c["status"] in ("failed", "error")]
        for c in bad:
            lines.append(f"- **{c['case']['name']}**: {'; '.join(c.get('failures', [])) or c.get('reason', '')}")
        lines.append("")
    kern = _load(out_dir / "kernels.json")
    lines += ["## Layer step times (median ms, training step)", ""]
    if kern is None:
        lines += ["kernels.json missing or unreadable", ""]
    else:
        impls = ("triton", "torch", "spikingjelly", "floor_fp32", "floor_tf32", "floor_bf16", "int8_mm")
        lines += ["| layer | " + " | ".join(impls) + " | triton / floor_fp32 |",
                  "|---|" + "---|" * (len(impls) + 1)]
        for e in kern.get("layers", []):
            ms = {k: (v or {}).get("median_ms") for k, v in (e.get("step_ms") or {}).items()}
            ratio = ms["triton"] / ms["floor_fp32"] if ms.get("triton") and ms.get("floor_fp32") else None
            lines.append(f"| {e['label']} | " + " | ".join(_fmt(ms.get(i)) for i in impls) +
                         f" | {_fmt(ratio)} |" + ("" if e.get("status") == "ok" else f" {e.get('status')}"))
        inv = kern.get("inventory") or {}
        lines += ["", "## Triton kernels that ran (JIT) vs compile report (sm_90 prediction)", ""]
        if inv.get("error"):
            lines.append(f"inventory error: {inv['error']}")
        rows = inv.get("rows") or []
        if rows:
            lines += ["| kernel | warps/stages | regs (pred) | spills (pred) | smem B (pred) | HMMA | HGMMA | IMMA | "
                      "FFMA | STS.U8 |", "|---|---|---|---|---|---|---|---|---|---|"]
            for r in rows:
                p, s = r.get("predicted") or {}, r.get("sass") or {}
                lines.append(f"| {r['kernel']} | {r.get('num_warps')}/{r.get('num_stages')} | "
                             f"{r.get('regs', r.get('n_regs'))} ({p.get('regs', '-')}) | "
                             f"{r.get('n_spills', '-')} ({p.get('spill_bytes', '-')}) | "
                             f"{r.get('smem_bytes', '-')} ({p.get('smem_bytes', '-')}) | {s.get('HMMA', '-')} | "
                             f"{s.get('HGMMA', '-')} | {s.get('IMMA', '-')} | {s.get('FFMA', '-')} | "
                             f"{s.get('STS.U8', '-')} |")
        lines.append("")
    tests = out_dir / "tests.log"
    lines += ["## Tests (tests.log)", ""]
    if tests.exists():
        tail = [ln for ln in tests.read_text(errors="replace").splitlines()
                if ln.startswith(("FAILED", "ERROR", "SKIPPED", "==")) or
                any(w in ln for w in (" passed", " failed", " skipped", " error"))]
        lines += ["```", *tail[-25:], "```", ""]
    else:
        lines += ["tests.log missing", ""]
    bench = _load(out_dir / "bench.json")
    lines += ["## benchmarks/run.py (bench.json)", ""]
    if bench is None:
        lines += ["bench.json missing or unreadable", ""]
    else:
        try:
            from benchmarks import report
            lines += [report.markdown_for_result(bench, "bench.json"), ""]
        except Exception as exc:
            lines += [f"report failed: {_error(exc)}", ""]
    return "\n".join(lines) + "\n"


def phase_summary(out_dir: pathlib.Path) -> int:
    from binwslt.train import atomic_write_bytes
    for stray in out_dir.glob(".*.tmp"):  # a write cut off mid-way: keep the folder within its 8 files
        stray.unlink()
    text = summary_markdown(out_dir).encode()
    atomic_write_bytes(str(out_dir / "summary.md"), lambda f: f.write(text))
    extra = sorted(p.name for p in out_dir.iterdir() if p.name not in FILES)
    if extra:
        print(f"[summary] unexpected files in {out_dir}: {extra}", flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("phase", choices=("env", "correctness", "kernels", "summary", "aot-inventory"))
    p.add_argument("--out", default=None, help="output folder")
    p.add_argument("--deadline", type=float, default=None, help="start no case after this time (epoch seconds)")
    p.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    args = p.parse_args(argv)
    if args.phase == "aot-inventory":
        return aot_inventory_main()
    if args.out is None:
        p.error("--out is required")
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    deadline = args.deadline if args.deadline is not None else time.time() + 120
    _setup(args.dry_run)
    if args.phase == "env":
        write_json(out_dir / "env.json", environment(args.dry_run))
        return 0
    if args.phase == "correctness":
        return phase_correctness(out_dir, deadline, args.dry_run)
    if args.phase == "kernels":
        return phase_kernels(out_dir, deadline, args.dry_run)
    return phase_summary(out_dir)


if __name__ == "__main__":
    sys.exit(main())
