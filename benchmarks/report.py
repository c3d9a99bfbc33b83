"""Turn every benchmarks/results/*.json (from run.py) into benchmarks/results/README.md and a PNG plot.

    python benchmarks/report.py [--results benchmarks/results]

The README gets, per results file: the command and machine, the issue's targets checked against the measured
figures (met / not met, with the numbers), the training-step, forward and saved-bytes tables (ratios to the
reference and to the bare-convolution floor, saved bytes relative to SpikingJelly) and the modelled memory
traffic. ``results/notes.md``, if present, goes verbatim before the tables (the analysis of the targets).
"""
from __future__ import annotations

import argparse
import json
import pathlib
from typing import List, Optional

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
IMPL_ORDER = ("reference", "torch", "triton", "spikingjelly", "snntorch", "floor")
IMPL_COLOR = {"reference": "tab:blue", "torch": "tab:orange", "triton": "tab:purple", "spikingjelly": "tab:green",
              "snntorch": "tab:red", "floor": "tab:gray"}
IMPL_TITLE = {"reference": "reference", "torch": "torch", "triton": "triton", "spikingjelly": "SpikingJelly",
              "snntorch": "snnTorch", "floor": "bare conv (floor)"}


def _impls(result) -> List[str]:
    present = set()
    for entry in result["layers"] + result["models"]:
        present.update(entry["impls"])
    return [i for i in IMPL_ORDER if i in present]


def _ms(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _cell_time(res: dict, mode: str, impl: str) -> str:
    if res is None:
        return "-"
    if res.get("status") in ("skipped", "error", "failed"):
        return res["status"]
    t = (res.get(mode) or {}).get("median_ms")
    if t is None:
        return "-"
    r = res.get("ratios", {})
    parts = []
    sp, fl = r.get(f"{mode}_speedup_vs_reference"), r.get(f"{mode}_over_floor")
    if sp is not None and impl != "reference":
        parts.append(f"{sp:.2f}x ref")
    if fl is not None and impl != "floor":
        parts.append(f"{fl:.2f} floor")
    return f"{_ms(t)}" + (f" ({', '.join(parts)})" if parts else "")


def _mib(b: Optional[int]) -> str:
    if b is None:
        return "-"
    return f"{b / 2**20:.3g}" if b >= 2**20 / 100 else f"{b / 2**10:.3g} KiB"


def _cell_saved(res: dict) -> str:
    if res is None:
        return "-"
    if res.get("status") in ("skipped", "error", "failed"):
        return res["status"]
    b = res.get("saved_bytes")
    if b is None:
        return "-"
    ratio = res.get("ratios", {}).get("saved_vs_spikingjelly")
    return _mib(b) + (f" ({ratio:.3f} SJ)" if ratio is not None else "")


def _table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _time_table(entries, impls, mode) -> str:
    header = ["case"] + [IMPL_TITLE[i] + " ms" for i in impls]
    rows = [[e["label"]] + [_cell_time(e["impls"].get(i), mode, i) for i in impls] for e in entries]
    return _table(header, rows)


def _saved_table(entries, impls) -> str:
    header = ["case"] + [IMPL_TITLE[i] + " MiB" for i in impls]
    rows = [[e["label"]] + [_cell_saved(e["impls"].get(i)) for i in impls] for e in entries]
    return _table(header, rows)


def _problems(result) -> List[str]:
    out = []
    for entry in result["layers"] + result["models"]:
        for impl, res in entry["impls"].items():
            if res.get("status") in ("error", "failed"):  # failed: its check against the reference, not timed
                out.append(f"- {entry['label']} / {impl}: {res['status']}: {res.get('reason')}")
    seen = set()
    for entry in result["layers"] + result["models"]:
        for impl, res in entry["impls"].items():
            if res.get("status") == "skipped" and (impl, res.get("reason")) not in seen:
                seen.add((impl, res.get("reason")))
                out.append(f"- {impl} skipped: {res.get('reason')}")
    return out


# ------------------------------------------------------------------------------------------------- targets
def _median(entry, impl, mode="train"):
    return ((entry["impls"].get(impl) or {}).get(mode) or {}).get("median_ms")


def _saved(entry, impl):
    return (entry["impls"].get(impl) or {}).get("saved_bytes")


def _check(name: str, value: Optional[float], op: str, bound: float, detail: str) -> dict:
    if value is None:
        return {"target": name, "met": None, "value": None, "detail": "not measured: " + detail}
    met = value >= bound if op == ">=" else value <= bound
    return {"target": name, "met": met, "value": value, "detail": detail}


def _div(a, b):
    return a / b if a is not None and b else None


def targets(result) -> List[dict]:
    """The issue's targets evaluated on ``result``: ``[{target, met (True/False/None), value, detail}]``."""
    meta = result["meta"]
    if meta.get("quick"):
        return []
    checks = []
    if meta["device"] == "cpu":
        entry = next((m for m in result["models"] if m.get("model", {}).get("name") == "conv4"
                      and m["timesteps"] == 4 and m["batch"] == 32 and m["model"]["width"] == 1.0
                      and m["model"]["image_size"] == 32), None)
        if entry is None:
            return []
        ref, torch_, sj, floor = (_median(entry, i) for i in ("reference", "torch", "spikingjelly", "floor"))
        label = "CPU Conv-4 step, T=4, N=32, 32x32"
        checks.append(_check(f"{label}: torch >= 3x faster than reference", _div(ref, torch_), ">=", 3.0,
                             f"reference {_ms(ref)} ms / torch {_ms(torch_)} ms"))
        checks.append(_check(f"{label}: torch at least as fast as SpikingJelly", _div(sj, torch_), ">=", 1.0,
                             f"SpikingJelly {_ms(sj)} ms / torch {_ms(torch_)} ms"))
        checks.append(_check(f"{label}: torch within 1.2x of the bare convolutions", _div(torch_, floor), "<=", 1.2,
                             f"torch {_ms(torch_)} ms / floor {_ms(floor)} ms"))
        s_t, s_sj = _saved(entry, "torch"), _saved(entry, "spikingjelly")
        checks.append(_check(f"{label}: torch saved bytes <= 1/4 of SpikingJelly's", _div(s_t, s_sj), "<=", 0.25,
                             f"torch {_mib(s_t)} MiB / SpikingJelly {_mib(s_sj)} MiB"))
        return checks
    layers = [e for e in result["layers"] if e.get("shape", {}).get("model") == "vgg11"
              and e["timesteps"] == 4 and e["batch"] == 128]
    if not layers:
        return []
    label = f"GPU VGG-11 layers (T=4, N=128, {len(layers)} layers, summed)"

    def total(impl, mode="train"):
        vals = [_median(e, impl, mode) for e in layers]
        return None if any(v is None for v in vals) else sum(vals)

    def total_saved(impl):
        vals = [_saved(e, impl) for e in layers]
        return None if any(v is None for v in vals) else sum(vals)

    tri, ref, sj = total("triton"), total("reference"), total("spikingjelly")
    checks.append(_check(f"{label}: triton step >= 3x faster than reference", _div(ref, tri), ">=", 3.0,
                         f"reference {_ms(ref)} ms / triton {_ms(tri)} ms"))
    checks.append(_check(f"{label}: triton step >= 1.5x faster than SpikingJelly", _div(sj, tri), ">=", 1.5,
                         f"SpikingJelly {_ms(sj)} ms / triton {_ms(tri)} ms"))
    tf, ff = total("triton", "forward"), total("floor", "forward")
    checks.append(_check(f"{label}: triton forward within 1.2x of the bare conv", _div(tf, ff), "<=", 1.2,
                         f"triton {_ms(tf)} ms / floor {_ms(ff)} ms (cuDNN; the floor is not an int8 GEMM)"))
    st, ssj = total_saved("triton"), total_saved("spikingjelly")
    checks.append(_check(f"{label}: triton saved bytes <= 1/8 of SpikingJelly's", _div(st, ssj), "<=", 0.125,
                         f"triton {_mib(st)} MiB / SpikingJelly {_mib(ssj)} MiB"))
    return checks


def _targets_md(checks) -> str:
    if not checks:
        return ""
    rows = []
    for c in checks:
        verdict = {True: "**met**", False: "**not met**", None: "not measured"}[c["met"]]
        value = "-" if c["value"] is None else f"{c['value']:.3g}"
        rows.append([c["target"], verdict, value, c["detail"]])
    return _table(["target", "verdict", "ratio", "figures (medians)"], rows)


# -------------------------------------------------------------------------------------------------- output
def markdown_for_result(result: dict, name: str) -> str:
    """Markdown of one results file: header, targets, time/saved/traffic tables, problems."""
    meta, impls = result["meta"], _impls(result)
    where = meta.get("gpu") or f"CPU, {meta.get('cpu_count')} cores, {meta.get('torch_threads')} torch threads"
    parts = [f"### {name}", "",
             f"`{meta['command']}` on {where}, {meta['date_utc']}, torch {meta['torch']}, "
             f"commit {meta.get('git_commit')}, {meta['dtype']}{', quick mode' if meta.get('quick') else ''}; "
             f"versions: " + ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items()) + "."]
    if meta.get("loadavg_start") is not None:
        parts.append(f"Load average at start {meta['loadavg_start'][0]:.1f}, at end "
                     f"{(meta.get('loadavg_end') or [float('nan')])[0]:.1f}; wall {meta.get('wall_s', 0):.0f} s.")
    if meta.get("note"):
        parts.append(f"Note: {meta['note']}")
    parts.append("")
    checks = targets(result)
    if checks:
        parts += ["**Targets**", "", _targets_md(checks), ""]
    cell_help = ("Cells: median ms (speedup over the reference backend, time relative to the bare convolutions); "
                 "a training step is forward + backward.")
    if result["models"]:
        parts += ["**Whole models, training step**", "", cell_help, "",
                  _time_table(result["models"], impls, "train"), "",
                  "**Whole models, bytes saved for backward** (parameters excluded; ratio to SpikingJelly)", "",
                  _saved_table(result["models"], impls), ""]
    if result["layers"]:
        parts += ["**Layers, training step**", "", cell_help, "", _time_table(result["layers"], impls, "train"), "",
                  "**Layers, forward only** (no_grad, training-mode BatchNorm)", "",
                  _time_table(result["layers"], impls, "forward"), "",
                  "**Layers, bytes saved for backward**", "", _saved_table(result["layers"], impls), "",
                  "**Layers, modelled forward memory traffic** (benchmarks/memory.py)", "",
                  _table(["case", "fused MiB", "eager MiB", "eager / fused"],
                         [[e["label"], _mib(e["traffic"]["fused_bytes"]), _mib(e["traffic"]["eager_bytes"]),
                           f"{e['traffic']['eager_over_fused']:.2f}"] for e in result["layers"] if "traffic" in e]),
                  ""]
    check = result.get("interpreter_check")
    if check:
        res = check["impls"]["triton"]
        parts += [f"triton under TRITON_INTERPRET=1 ({check['label']}, not timed): {res['status']}"
                  + (f" - {res.get('reason')}" if res.get("reason") else "")
                  + (f", saved {_mib(res.get('saved_bytes'))} MiB" if res.get("saved_bytes") is not None else ""), ""]
    problems = _problems(result)
    if problems:
        parts += ["Skipped or failed:", ""] + problems + [""]
    return "\n".join(parts)


def plot(results: List[tuple], path: pathlib.Path) -> Optional[pathlib.Path]:
    """One panel per results file: training-step time relative to the floor, per case and implementation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not results:
        return None
    heights = [max(2.5, 0.0) + 2.0 * (len(r["layers"]) > 0) for _, r in results]
    fig, axes = plt.subplots(len(results), 1, figsize=(12, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (name, result) in zip(axes[:, 0], results):
        entries = result["models"] + result["layers"]
        series = {}
        for impl in _impls(result):
            vals = [((e["impls"].get(impl) or {}).get("ratios") or {}).get("train_over_floor") for e in entries]
            if impl != "floor" and any(v is not None for v in vals):
                series[impl] = vals
        width = 0.8 / max(1, len(series))
        for k, (impl, vals) in enumerate(series.items()):
            xs = [i + k * width for i, v in enumerate(vals) if v is not None]
            ax.bar(xs, [v for v in vals if v is not None], width, label=IMPL_TITLE[impl], color=IMPL_COLOR[impl])
        ax.set_xlim(-0.5, max(len(entries), 3) - 0.5 + 0.4)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_yscale("log")
        ax.set_ylabel("train step / bare conv")
        ax.set_title(f"{name} ({result['meta'].get('gpu') or 'CPU'}; lower is better, 1 = the floor)")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(entries))])
        ax.set_xticklabels([e["label"].replace(" T=", "\nT=") for e in entries], rotation=60, ha="right", fontsize=7)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load_results(folder: pathlib.Path) -> List[tuple]:
    """``[(file name, result dict)]`` of every ``*.json`` in ``folder`` that `benchmarks/run.py` wrote (a dict
    with ``layers`` and ``models``), sorted by name; the other JSON files there (compile reports, cpu_step,
    cpu_gemm, roofline) have reports of their own beside them."""
    out = []
    for p in sorted(folder.glob("*.json")):
        result = json.loads(p.read_text())
        if isinstance(result, dict) and "layers" in result and "models" in result:
            out.append((p.name, result))
    return out


def write_report(folder: pathlib.Path = RESULTS) -> pathlib.Path:
    """Write ``folder/README.md`` and ``folder/performance.png``; returns the README path."""
    results = load_results(folder)
    png = plot(results, folder / "performance.png")
    parts = ["# Benchmark results", "",
             "Generated by `python benchmarks/report.py` from the JSON files here (each made by "
             "`benchmarks/run.py`, command in its header). How the suite measures: ../README.md.", ""]
    if png is not None:
        parts += [f"![training step relative to the bare convolutions]({png.name})", ""]
    if not results:
        parts += ["No results yet.", ""]
    notes = folder / "notes.md"
    if notes.exists():
        parts += [notes.read_text().strip(), "", "## Measured figures", ""]
    for name, result in results:
        parts.append(markdown_for_result(result, name))
    out = folder / "README.md"
    out.write_text("\n".join(parts).rstrip() + "\n")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="benchmarks/results/*.json -> README.md + performance.png")
    p.add_argument("--results", default=str(RESULTS), help="folder of results JSON files")
    args = p.parse_args(argv)
    out = write_report(pathlib.Path(args.results))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
