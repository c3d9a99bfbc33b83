"""Run the benchmark suite side by side in one process, print a markdown table, write JSON.

    python benchmarks/run.py --device cpu  --out benchmarks/results/cpu-<date>.json  [--quick]
    python benchmarks/run.py --device cuda --out benchmarks/results/<gpu>-<date>.json [--quick]

Per layer case and per whole-model case (benchmarks/shapes.py) every implementation of benchmarks/cases.py is
built, its saved-for-backward bytes measured, then training steps and forward passes are timed round-robin
(benchmarks/timing.py). Ratios: ``speedup`` = reference time / time, ``x floor`` = time / bare-convolution time,
``saved/SJ`` = saved bytes / SpikingJelly's. Layer cases also carry the modelled memory traffic
(benchmarks/memory.py). Before a case is timed, the torch and triton backends are checked against the reference
backend in float64 (spikes and every gradient; a whole model's logits): a case that fails is reported as failed
and not timed. The JSON is rewritten after every case. On a CPU the ``triton`` backend runs only under TRITON_INTERPRET=1 on one tiny layer, to
check that it runs: it is never timed there. Needs no network; uses the package from this working tree.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import os
import pathlib
import platform
import shlex
import sys
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Per mode: timed rounds (at most), warmup calls, seconds of timed rounds per case and pass before stopping early
# (never before 3 rounds). Every runner has already run one untimed training step and one saved-bytes forward.
SETTINGS = {
    ("cpu", True): dict(rounds=3, warmup=0, budget_s=1.0),
    ("cpu", False): dict(rounds=5, warmup=0, budget_s=30.0),
    ("cuda", True): dict(rounds=5, warmup=2, budget_s=1.0),
    ("cuda", False): dict(rounds=25, warmup=3, budget_s=4.0),
}


def _use_working_tree(device: str) -> None:
    """Import binwslt (and kernels/ as binwslt.kernels) from this working tree, installed or not."""
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated: before they are imported
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, str(ROOT))
    import binwslt
    if pathlib.Path(binwslt.__file__).resolve().parent != ROOT / "binwslt":
        raise RuntimeError(f"binwslt imports from {binwslt.__file__}, not from the working tree {ROOT}")
    try:
        import binwslt.kernels  # noqa: F401  (installed: setup.py maps kernels/ to binwslt.kernels)
    except ImportError:
        spec = importlib.util.spec_from_file_location("binwslt.kernels", ROOT / "kernels" / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / "kernels")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["binwslt.kernels"] = module
        spec.loader.exec_module(module)
        binwslt.kernels = module


def _error(exc: BaseException) -> str:
    last = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return last[:500]


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch
        torch.cuda.empty_cache()


CHECKED = ("torch", "triton")  # the binwslt backends other than the oracle; peers and floors compute other functions
MODEL_LOGITS_RTOL = 0.05  # whole models: ||logits - oracle's|| / ||oracle's||. A spike flipped by fp32 rounding in
# one layer changes the spikes of the next ones; over 5-19 layers and T=4 a few 1e-3 of the readout moves.


def _layer_run(impl, case, device, dtype, seed=0):
    """(out, leaves, stats) of one forward of a layer case on ``impl`` (benchmarks/gpu_check_compare.compare's
    input): leaves are the input (when it takes gradients), the residual and the module's trainable parameters."""
    import torch
    from benchmarks import cases
    torch.manual_seed(seed)  # as cases.layer_runner: every backend's module starts from the same draw
    module = cases.layer_module(impl, case.shape, case.timesteps).to(device=device, dtype=dtype)
    x, residual = cases.layer_inputs(case.shape, case.timesteps, case.batch, device, dtype, seed)
    out = module(x, residual=residual)
    leaves = {"x": x, "residual": residual}
    leaves.update({name: p for name, p in module.named_parameters() if p.requires_grad})
    return out, {k: v for k, v in leaves.items() if v is not None and v.requires_grad}, {}


def check_case(kind: str, case, impl: str, device: str, dtype) -> dict:
    """``impl``'s result on one case against backend="reference" in float64 on the same device (no TF32 in
    float64). Layers: spikes and every gradient (benchmarks/gpu_check_compare.compare, general tolerances);
    models: the logits within MODEL_LOGITS_RTOL. Returns ``{"ok": bool, ...}``; never raises."""
    import torch
    from benchmarks import cases
    from benchmarks.gpu_check_compare import GENERAL_TOL, compare
    try:
        if kind == "layer":
            result = compare(_layer_run(impl, case, device, dtype), _layer_run("reference", case, device,
                                                                               torch.float64), exact=False,
                             **GENERAL_TOL)
            return {"ok": result.ok, "failures": list(result.failures), "spike_mismatch": result.spike_mismatch,
                    "neuron_mismatch": result.neuron_mismatch,
                    "grad_max_rel_err": {k: e.max_rel_err for k, e in result.grads.items()}}
        logits = {}
        for name, dt in ((impl, dtype), ("reference", torch.float64)):
            torch.manual_seed(0)
            model = cases.model_module(name, case).to(device=device, dtype=dt).train()
            g = torch.Generator().manual_seed(0)
            x = torch.rand((case.batch, 3, case.image_size, case.image_size), generator=g).to(device=device, dtype=dt)
            with torch.no_grad():
                logits[name] = model(x).double()
        err = float((logits[impl] - logits["reference"]).norm() / logits["reference"].norm().clamp_min(1e-30))
        ok = bool(torch.isfinite(logits[impl]).all()) and err <= MODEL_LOGITS_RTOL
        return {"ok": ok, "logits_rel_l2": err,
                "failures": [] if ok else [f"logits rel L2 error {err:.3g} > {MODEL_LOGITS_RTOL}"]}
    except Exception as exc:
        return {"ok": False, "failures": [f"check raised {_error(exc)}"]}
    finally:
        _free(device)


def measure_case(kind: str, case, impls, device: str, dtype, settings: dict, timed: bool = True) -> dict:
    """Build every implementation of one case, check the binwslt backends against the reference (a failed check
    is reported as failed and not timed), measure saved bytes, then time train steps and forwards."""
    import torch
    from benchmarks import cases, timing
    make = cases.layer_runner if kind == "layer" else cases.model_runner
    entry = {"label": case.label, "timesteps": case.timesteps, "batch": case.batch, "impls": {}}
    runners = {}
    for impl in impls:
        res = entry["impls"][impl] = {"status": "ok"}
        if impl in CHECKED and cases.availability(impl, device) is None:
            if dtype != torch.float32:
                res["check"] = {"ok": None, "failures": [f"not checked: the tolerances are for float32, not {dtype}"]}
            else:
                res["check"] = check_case(kind, case, impl, device, dtype)
                if not res["check"]["ok"]:
                    res.update(status="failed", reason="check against the reference: " +
                               "; ".join(res["check"]["failures"])[:400])
                    continue
        try:
            runner = make(impl, case, device, dtype)
            runner.train_step()  # first call: lazy init, compilation; also proves the step runs
            res["saved_bytes"] = runner.saved_bytes()
            runners[impl] = runner
        except cases.Unavailable as exc:
            res.update(status="skipped", reason=str(exc))
        except Exception as exc:  # report it in the table and go on with the others
            res.update(status="error", reason=_error(exc))
            _free(device)
    if timed and runners:
        for mode in ("train", "forward"):
            fns = {impl: (r.train_step if mode == "train" else r.infer) for impl, r in runners.items()}
            try:
                seconds = timing.interleaved(fns, **settings)
            except Exception as exc:
                for impl in runners:
                    entry["impls"][impl].update(status="error", reason=f"{mode}: {_error(exc)}")
                break
            for impl, s in seconds.items():
                entry["impls"][impl][mode] = timing.summary(s)
    elif not timed:
        for impl in runners:
            entry["impls"][impl]["status"] = "ran"
    del runners
    _free(device)
    return entry


def interpreter_check(device_dtype) -> dict:
    """The triton backend on one tiny layer under TRITON_INTERPRET=1: it runs, its spikes are 0/1 of the right
    shape. Never timed."""
    from benchmarks import cases, shapes
    case = shapes.interpreter_case()
    entry = measure_case("layer", case, ("triton",), "cpu", device_dtype, {}, timed=False)
    res = entry["impls"]["triton"]
    if res["status"] == "ran":
        try:
            out = cases.layer_runner("triton", case, "cpu", device_dtype).infer()
            oh, ow = case.shape.out_hw
            want = (case.timesteps, case.batch, case.shape.out_channels, oh, ow)
            binary = bool(((out == 0) | (out == 1)).all())
            if tuple(out.shape) != want or not binary:
                res.update(status="error", reason=f"output shape {tuple(out.shape)} (want {want}), binary={binary}")
        except Exception as exc:
            res.update(status="error", reason=_error(exc))
    return entry


def add_ratios(entry: dict) -> None:
    """speedup (reference / impl), over_floor (impl / floor) for train and forward; saved_vs_spikingjelly."""
    impls = entry["impls"]

    def med(impl, mode):
        return (impls.get(impl, {}).get(mode) or {}).get("median_ms")

    sj_saved = impls.get("spikingjelly", {}).get("saved_bytes")
    for impl, res in impls.items():
        ratios = {}
        for mode in ("train", "forward"):
            t, ref, floor = med(impl, mode), med("reference", mode), med("floor", mode)
            ratios[f"{mode}_speedup_vs_reference"] = ref / t if t and ref else None
            ratios[f"{mode}_over_floor"] = t / floor if t and floor else None
        saved = res.get("saved_bytes")
        ratios["saved_vs_spikingjelly"] = saved / sj_saved if saved is not None and sj_saved else None
        res["ratios"] = ratios


def environment(device: str, args) -> dict:
    import torch
    from benchmarks.peers import PEERS, peer_version
    meta = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device, "quick": args.quick, "dtype": args.dtype,
        "command": "python benchmarks/run.py " + shlex.join(sys.argv[1:]),
        "note": args.note, "python": platform.python_version(), "torch": torch.__version__,
        "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "versions": {p: peer_version(p) for p in PEERS + ("triton",)},
        "prune_rate": 0.4, "neuron": "LIFConfig() defaults: decay 0.99, threshold 1, hard reset 0, atan",
    }
    if device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
        meta["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    try:
        import subprocess
        meta["git_commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                            capture_output=True, text=True, timeout=10).stdout.strip() or None
    except Exception:
        meta["git_commit"] = None
    return meta


def schedule(plan: dict, only=None):
    """``[(kind, case)]`` in run order: the first model's layers (the target's), the whole models, the other layers,
    so that a time limit cuts the least important cases."""
    layers = plan["layers"] if only in (None, "layers") else []
    models = plan["models"] if only in (None, "models") else []
    first = layers[0].shape.model if layers else None
    primary = [c for c in layers if c.shape.model == first]
    rest = [c for c in layers if c.shape.model != first]
    return [("layer", c) for c in primary] + [("model", c) for c in models] + [("layer", c) for c in rest]


def write_result(result: dict, path: pathlib.Path) -> None:
    """Rewrite the JSON atomically (binwslt.train.atomic_write_bytes): after every case, so a cut-off keeps the
    cases that finished."""
    from binwslt.train import atomic_write_bytes
    data = (json.dumps(result, indent=1) + "\n").encode()
    atomic_write_bytes(str(path), lambda f: f.write(data))


def run_suite(args) -> dict:
    import torch
    from benchmarks import cases, memory, shapes
    from benchmarks.peers import peer_status
    device, dtype = args.device, getattr(torch, args.dtype)
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here")
    settings = dict(SETTINGS[(device, args.quick)])
    if args.rounds is not None:
        settings["rounds"] = args.rounds
    if args.budget is not None:
        settings["budget_s"] = args.budget
    impls = [i for i in cases.IMPLS if i in args.impls]
    if device == "cpu":
        impls = [i for i in impls if i != "triton"]  # interpreted: checked once below, never timed
    plan = shapes.suite(device, args.quick)
    result = {"meta": environment(device, args), "settings": settings,
              "peers": {p: {"available": why is None, "reason": why} for p, why in peer_status().items()},
              "layers": [], "models": [], "interpreter_check": None}
    start = time.perf_counter()
    if device == "cpu" and "triton" in args.impls and args.only is None:
        result["interpreter_check"] = interpreter_check(dtype)
        print(f"[triton under the interpreter] {result['interpreter_check']['impls']['triton']}", flush=True)
    for kind, case in schedule(plan, args.only):
        key = kind + "s"
        t0 = time.perf_counter()
        if args.max_minutes is not None and t0 - start > 60 * args.max_minutes:
            entry = {"label": case.label, "timesteps": case.timesteps, "batch": case.batch,
                     "impls": {i: {"status": "skipped", "reason": f"--max-minutes {args.max_minutes:g} reached"}
                               for i in impls}}
        else:
            entry = measure_case(kind, case, impls, device, dtype, settings)
        if kind == "layer":
            entry["shape"] = case.shape.to_dict()
            fused = memory.fused_traffic(case.shape, case.timesteps, case.batch)
            eager = memory.eager_traffic(case.shape, case.timesteps, case.batch)
            entry["traffic"] = {"fused_bytes": fused, "eager_bytes": eager, "eager_over_fused": eager / fused}
        else:
            entry["model"] = {"name": case.name, "width": case.width, "image_size": case.image_size}
        add_ratios(entry)
        result[key].append(entry)
        result["meta"]["wall_s"] = time.perf_counter() - start
        write_result(result, pathlib.Path(args.out))
        print(f"[{time.perf_counter() - start:7.1f}s] {case.label}: {time.perf_counter() - t0:.1f}s", flush=True)
    result["meta"]["wall_s"] = time.perf_counter() - start
    result["meta"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), required=True)
    p.add_argument("--out", required=True, help="JSON path, e.g. benchmarks/results/cpu-2026-11-25.json")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few rounds (CI)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--impls", nargs="+", default=None, help="subset of implementations (default: all)")
    p.add_argument("--rounds", type=int, default=None, help="override the timed rounds per case")
    p.add_argument("--budget", type=float, default=None, help="override the seconds of timed rounds per case")
    p.add_argument("--only", choices=("layers", "models"), default=None, help="run only the layer or model cases")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="start no new case after this many minutes (default: 8.5 on cuda, none on cpu); the cases "
                        "left are recorded as skipped")
    p.add_argument("--note", default="", help="free text stored with the results (e.g. the machine's load)")
    args = p.parse_args(argv)
    if args.max_minutes is None and args.device == "cuda":
        args.max_minutes = 8.5
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    _use_working_tree(args.device)
    from benchmarks import cases, report
    if args.impls is None:
        args.impls = list(cases.IMPLS)
    unknown = sorted(set(args.impls) - set(cases.IMPLS))
    if unknown:
        raise SystemExit(f"--impls: unknown {unknown}; choose from {list(cases.IMPLS)}")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = run_suite(args)
    result["meta"]["complete"] = True
    write_result(result, out)
    print()
    print(report.markdown_for_result(result, out.name))
    print(f"\nwrote {out} in {result['meta']['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
