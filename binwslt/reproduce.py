"""``binwslt reproduce table1|table2|fig2|fig3``: the paper's grids, one run per cell, fanned out on Ray.

A target expands into *cells* (:class:`Cell`): one ``find``/``train``/``finetune`` run each, in its own folder
``OUT/runs/<cell key>``. Cells are shared between targets (Table 1's r_p = 0.4 runs are Fig. 2's points at 0.4),
so ``OUT`` (default ``runs/reproduce/<dataset>-<scale>``) can hold every target of one dataset and scale. A cell
whose folder holds finished metrics with the same settings is skipped; one with a checkpoint resumes from it
(:func:`binwslt.sweep.run_or_resume`), so a killed grid continues where it stopped when run again.

Engines: ``ray`` runs every cell as one Ray task with its CPU/GPU needs (``num_cpus=cpus_per_run``,
``num_gpus=gpus_per_run``; by default one GPU per run when the cluster has GPUs), on a local Ray started here
or on an existing cluster (``address``); a fine-tuning cell takes its ticket's task as an argument, so Ray starts
it when the ticket exists. ``local`` runs the cells one at a time in this process. ``auto`` takes Ray when it is
installed (``pip install binwslt[ray]``). A failed cell is reported (status, error) and the others go on.

The target's results are written from the cells' ``metrics.json`` files as ``OUT/<target>.md``, ``.csv`` and
``.png``, with the paper's numbers (:mod:`binwslt.paper`) beside the measured ones and their difference.

| target | cells per model and seed (``paper`` scale) |
|---|---|
| ``table1`` | ann, snn, bnn-binact, binwslt at r_p 0.4, T 4, λ 0.99 (default models: all four, CIFAR-10) |
| ``table2`` | the same, reporting OPs and energy too (default models: vgg11, resnet19, CIFAR-100) |
| ``fig2`` | (a) binwslt T 4, binwslt T 1, bnn-binact at r_p 0.2..0.9, ann and snn once; (b) binwslt at r_p 0.4/0.5/0.6 and snn for T in 1,2,4,6,8, bnn-binact at each r_p; (c) the same for λ in 0.99,0.8,...,0.2 |
| ``fig3`` | (left) energy of ann, snn, binwslt at r_p 0.4; (right) binwslt and its fine-tuning at r_p 0.2/0.4/0.6/0.8 |
"""
from __future__ import annotations

import csv
import datetime
import json
import math
import os
import platform
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from binwslt import paper
from binwslt.sweep import KIND_LABELS, announce, finished_metrics, point_bar, run_or_resume

TARGETS = ("table1", "table2", "fig2", "fig3")
ENGINES = ("auto", "ray", "local")
MODEL_NAMES = ("conv4", "vgg9", "vgg11", "resnet19")
KINDS = ("ann", "snn", "bnn-binact", "binwslt")
DEFAULT_DATASET = {"table1": "cifar10", "table2": "cifar100", "fig2": "cifar10", "fig3": "cifar10"}
DEFAULT_MODELS = {"table1": MODEL_NAMES, "table2": ("vgg11", "resnet19"), "fig2": MODEL_NAMES, "fig3": MODEL_NAMES}


@dataclass(frozen=True)
class Scale:
    """How big a reproduction is: ``run`` fields every cell gets, and the value lists of the figures' axes."""

    name: str
    run: Tuple[Tuple[str, object], ...]
    prune_rates: Tuple[float, ...]
    timesteps: Tuple[int, ...]
    decays: Tuple[float, ...]
    panel_rates: Tuple[float, ...]
    finetune_rates: Tuple[float, ...]


# ``paper``: the paper's axes, and the run defaults of binwslt.train (200 epochs on CIFAR, 10 on digits; batch 128
# on CIFAR; Adam, cosine). ``quick``: a smoke run of the same code paths in seconds per cell.
SCALES = {
    "paper": Scale("paper", (), prune_rates=(0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), timesteps=(1, 2, 4, 6, 8),
                   decays=(0.99, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2), panel_rates=(0.4, 0.5, 0.6),
                   finetune_rates=(0.2, 0.4, 0.6, 0.8)),
    "quick": Scale("quick", (("epochs", 1), ("max_steps", 2), ("eval_batches", 1), ("eval_batch_size", 64),
                             ("width", 0.125)),
                   prune_rates=(0.4, 0.8), timesteps=(1, 4), decays=(0.99, 0.5), panel_rates=(0.4,),
                   finetune_rates=(0.4, 0.8)),
}
BASE = {"prune_rate": 0.4, "timesteps": 4, "decay": 0.99}


@dataclass(frozen=True)
class Cell:
    """One run of a grid: ``key`` (its folder name under ``OUT/runs``), the ``binwslt.train.RunConfig`` fields
    that define it (``out`` excluded), and ``needs``, the key of the find cell a fine-tuning cell starts from."""

    key: str
    model: str
    kind: str
    command: str
    prune_rate: float
    timesteps: int
    decay: float
    seed: int
    needs: Optional[str] = None

    def fields(self, dataset: str, runs_dir: str, extra: dict) -> dict:
        """The RunConfig fields of this cell (``extra``: scale and machine fields shared by every cell)."""
        out = os.path.join(runs_dir, self.key)
        f = dict(extra, command=self.command, model=self.model, kind=self.kind, dataset=dataset, seed=self.seed,
                 out=out)
        if self.kind in ("bnn-binact", "binwslt"):
            f["prune_rate"] = self.prune_rate
        if self.kind in ("snn", "binwslt"):
            f["timesteps"], f["decay"] = self.timesteps, self.decay
        if self.command == "finetune":
            # the model fields are the ticket's own (finetune takes them from the ticket; equal values are what it
            # records, so a finished fine-tuning run is recognised as the same cell)
            f["ticket"] = os.path.join(runs_dir, self.needs)
        return f


def _fmt(v) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"


def make_cell(model: str, kind: str, seed: int, prune_rate: float = 0.4, timesteps: int = 4,
              decay: float = 0.99) -> Cell:
    """The cell of one (model, kind, setting, seed); settings a kind does not use are normalised away."""
    binary, spiking = kind in ("bnn-binact", "binwslt"), kind in ("snn", "binwslt")
    rp = float(prune_rate) if binary else 0.0
    t, lam = (int(timesteps), float(decay)) if spiking else (BASE["timesteps"], BASE["decay"])
    key = f"{model}-{kind}" + (f"-rp{_fmt(rp)}" if binary else "") + (f"-T{t}-lam{_fmt(lam)}" if spiking else "") \
        + f"-s{seed}"
    return Cell(key, model, kind, "find" if binary else "train", rp, t, lam, int(seed))


def finetune_cell(found: Cell) -> Cell:
    """The fine-tuning cell of a binwslt find cell (Fig. 3 right)."""
    return Cell(found.key + "-ft", found.model, found.kind, "finetune", found.prune_rate, found.timesteps,
                found.decay, found.seed, needs=found.key)


@dataclass(frozen=True)
class Point:
    """Where a cell's result goes in a target: ``group`` (a table's rows or a figure's panel and series) and
    ``x`` (the swept value on a figure's axis; None in tables)."""

    cell: Cell
    group: Tuple
    x: Optional[float] = None


def grid(target: str, models: Sequence[str], seeds: Sequence[int], scale: Scale) -> List[Point]:
    """The points of ``target`` for ``models`` and ``seeds`` at ``scale`` (see the module docstring)."""
    pts: List[Point] = []
    for model in models:
        for seed in seeds:
            if target in ("table1", "table2"):
                pts += [Point(make_cell(model, k, seed), (model, k)) for k in KINDS]
            elif target == "fig2":
                for rp in scale.prune_rates:
                    pts.append(Point(make_cell(model, "binwslt", seed, prune_rate=rp), (model, "a", "binwslt T=4"), rp))
                    pts.append(Point(make_cell(model, "binwslt", seed, prune_rate=rp, timesteps=1),
                                     (model, "a", "binwslt T=1"), rp))
                    pts.append(Point(make_cell(model, "bnn-binact", seed, prune_rate=rp), (model, "a", "bnn-binact"),
                                     rp))
                for k in ("ann", "snn"):
                    pts.append(Point(make_cell(model, k, seed), (model, "a", k)))
                for panel, name, values in (("b", "timesteps", scale.timesteps), ("c", "decay", scale.decays)):
                    for v in values:
                        for rp in scale.panel_rates:
                            pts.append(Point(make_cell(model, "binwslt", seed, prune_rate=rp, **{name: v}),
                                             (model, panel, f"binwslt r_p={_fmt(rp)}"), v))
                        pts.append(Point(make_cell(model, "snn", seed, **{name: v}), (model, panel, "snn"), v))
                    for rp in scale.panel_rates:
                        pts.append(Point(make_cell(model, "bnn-binact", seed, prune_rate=rp),
                                         (model, panel, f"bnn-binact r_p={_fmt(rp)}")))
                    pts.append(Point(make_cell(model, "ann", seed), (model, panel, "ann")))
            elif target == "fig3":
                for k in ("ann", "snn", "binwslt"):
                    pts.append(Point(make_cell(model, k, seed), (model, "energy", k)))
                for rp in scale.finetune_rates:
                    found = make_cell(model, "binwslt", seed, prune_rate=rp)
                    pts.append(Point(found, (model, "finetune", "binwslt"), rp))
                    pts.append(Point(finetune_cell(found), (model, "finetune", "binwslt FT"), rp))
            else:
                raise ValueError(f"target must be one of {', '.join(TARGETS)}; got {target!r}")
    return pts


def unique_cells(points: Sequence[Point]) -> List[Cell]:
    """The distinct cells of ``points`` in first-seen order (a fine-tuning cell after the cell it needs)."""
    seen: Dict[str, Cell] = {}
    for p in points:
        seen.setdefault(p.cell.key, p.cell)
    return list(seen.values())


# --------------------------------------------------------------------------------------------------- engines


@dataclass
class Outcome:
    """What became of one cell: ``status`` "done" (ran now), "skipped" (already finished) or "failed"."""

    key: str
    status: str
    metrics: Optional[dict] = None
    error: str = ""
    placement: dict = field(default_factory=dict)


def _placement() -> dict:
    """Where this process runs: the host and, inside a Ray task, the GPU ids Ray gave it."""
    gpus: list = []
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            gpus = [str(g) for g in ray.get_gpu_ids()]
    return {"node": platform.node(), "gpus": gpus}


def _cell_task(fields: dict, threads: Optional[int], _needed=None) -> Tuple[str, dict, dict]:
    """Run one cell (in this process or a Ray worker); returns ``(status, metrics without history, placement)``."""
    from binwslt import train

    if threads is not None and fields.get("threads") is None:
        fields = dict(fields, threads=threads)
    cfg = train.RunConfig(**fields).resolved()
    metrics = finished_metrics(cfg.out, cfg.to_dict())
    status = "skipped" if metrics is not None else "done"
    if metrics is None:
        metrics = run_or_resume(fields)
    return status, {k: v for k, v in metrics.items() if k != "history"}, _placement()


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    cause = getattr(exc, "cause", None)  # ray.exceptions.RayTaskError keeps the task's exception here
    if cause is not None:
        text = (f"{type(cause).__name__}: {cause}").strip().splitlines()
        return text[0] if text else type(cause).__name__
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def run_local(cells: Sequence[Cell], fields: Callable[[Cell], dict], progress: bool = True,
              threads: Optional[int] = None) -> Dict[str, Outcome]:
    """Run ``cells`` one at a time in this process; a failed cell is recorded and the next one runs."""
    outcomes: Dict[str, Outcome] = {}
    with point_bar(len(cells), progress, "reproduce") as bar:
        for i, cell in enumerate(cells):
            announce(bar, i, len(cells), cell.key)
            if cell.needs and outcomes.get(cell.needs, Outcome(cell.needs, "done")).status == "failed":
                outcomes[cell.key] = Outcome(cell.key, "failed", error=f"needs {cell.needs}, which failed")
            else:
                try:
                    status, metrics, where = _cell_task(fields(cell), threads)
                    outcomes[cell.key] = Outcome(cell.key, status, metrics, placement=where)
                except Exception as exc:  # noqa: BLE001 - a failed run is reported, the others go on
                    outcomes[cell.key] = Outcome(cell.key, "failed", error=_error_text(exc))
            _report(outcomes[cell.key])
            bar.update(1)
    return outcomes


def run_ray(cells: Sequence[Cell], fields: Callable[[Cell], dict], address: Optional[str] = None,
            cpus_per_run: float = 1.0, gpus_per_run: Optional[float] = None) -> Dict[str, Outcome]:
    """Run every cell as one Ray task (``num_cpus=cpus_per_run``, ``num_gpus=gpus_per_run``).

    Uses the Ray already initialised in this process, else connects to ``address`` (an existing cluster, e.g.
    ``ray://head:10001`` or ``auto``) or starts a local one. ``gpus_per_run`` None: 1 when the cluster has GPUs,
    else 0. A fine-tuning cell gets its find cell's result as an argument, so it starts after it (and fails
    with it). Tasks run with ``max_retries=0`` for errors raised by a run: a failed cell is reported once.
    """
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError("engine='ray' needs Ray: pip install 'binwslt[ray]' (or use engine='local')") from exc
    started = False
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=True)
        started = True
    try:
        if gpus_per_run is None:
            gpus_per_run = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        threads = max(1, int(cpus_per_run))
        task = ray.remote(_cell_task).options(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=0)
        refs: Dict[str, object] = {}
        for cell in cells:
            f = dict(fields(cell), progress=False)  # workers have no terminal; the per-epoch lines still go to the log
            refs[cell.key] = task.remote(f, threads, refs[cell.needs] if cell.needs in refs else None)
        by_ref = {ref: key for key, ref in refs.items()}
        outcomes: Dict[str, Outcome] = {}
        pending = list(refs.values())
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                key = by_ref[ref]
                try:
                    status, metrics, where = ray.get(ref)
                    outcomes[key] = Outcome(key, status, metrics, placement=where)
                except Exception as exc:  # noqa: BLE001 - ray.exceptions.RayError and the task's own errors
                    outcomes[key] = Outcome(key, "failed", error=_error_text(exc))
                _report(outcomes[key], f"[{len(outcomes)}/{len(refs)}] ")
        return {c.key: outcomes[c.key] for c in cells}
    finally:
        if started:
            ray.shutdown()


def _report(o: Outcome, prefix: str = "  ") -> None:
    if o.status == "failed":
        print(f"{prefix}{o.key}: FAILED: {o.error}", flush=True)
    else:
        acc = (o.metrics or {}).get("test_accuracy")
        acc_text = f"test accuracy {100 * acc:.2f}%" if acc is not None else ""
        where = f" (on {o.placement['node']}, GPU {','.join(o.placement['gpus'])})" if o.placement.get("gpus") else ""
        print(f"{prefix}{o.key}: {o.status} {acc_text}{where}", flush=True)


def _ray_available() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------------------ aggregation


def read_cell_metrics(runs_dir: str, cell: Cell) -> Optional[dict]:
    """The finished ``metrics.json`` of ``cell`` under ``runs_dir``, or None."""
    from binwslt.train import METRICS_NAME

    path = os.path.join(runs_dir, cell.key, METRICS_NAME)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        metrics = json.load(f)
    return metrics if metrics.get("finished") else None


def _stats(values: Sequence[float]) -> Tuple[Optional[float], Optional[float], int]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None, 0
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
    return mean, std, len(vals)


def _num(v, digits=2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _sig(v) -> str:
    return "—" if v is None else f"{v:.4g}"


def _signed(v, digits=2) -> str:
    return "—" if v is None else f"{v:+.{digits}f}"


def _acc_text(mean, std, n) -> str:
    if mean is None:
        return "—"
    return f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "") + (f" (n={n})" if n > 1 else "")


@dataclass
class Report:
    """What :func:`reproduce` returns: the table's rows (the CSV's), the paths written, the cells' outcomes and
    the claim's verdict per model (tables only: True when BinW-SLT beats BNN-BinAct)."""

    target: str
    rows: List[dict] = field(default_factory=list)
    md_path: str = ""
    csv_path: str = ""
    png_path: str = ""
    outcomes: Dict[str, Outcome] = field(default_factory=dict)
    verdict: Dict[str, bool] = field(default_factory=dict)

    @property
    def failed(self) -> List[Outcome]:
        return [o for o in self.outcomes.values() if o.status == "failed"]


def _grouped(points, runs_dir) -> Dict[Tuple, Dict]:
    """group -> x -> list of metrics (one per seed)."""
    out: Dict[Tuple, Dict] = {}
    for p in points:
        m = read_cell_metrics(runs_dir, p.cell)
        out.setdefault(p.group, {}).setdefault(p.x, [])
        if m is not None:
            out[p.group][p.x].append(m)
    return out


def _acc_stats(ms):
    return _stats([100 * m["test_accuracy"] for m in ms if m.get("test_accuracy") is not None])


def _table_rows(target, points, runs_dir, dataset) -> Tuple[List[dict], Dict[str, bool]]:
    groups = _grouped(points, runs_dir)
    rows, verdict = [], {}
    paper_dataset = paper.TABLE1_DATASET if target == "table1" else paper.TABLE2_DATASET
    for (model, kind), by_x in groups.items():
        ms = by_x[None]
        mean, std, n = _acc_stats(ms)
        p_acc = paper.TABLE1.get(model, {}).get(kind) if target == "table1" else \
            (paper.TABLE2[model][kind][2] if model in paper.TABLE2 else None)
        ops, _, _ = _stats([m.get("ops_g") for m in ms])
        mj, _, _ = _stats([m.get("energy_mj") for m in ms])
        row = {"model": model, "kind": kind, "method": KIND_LABELS[kind], "dataset": dataset, "n": n,
               "acc_mean": mean, "acc_std": std, "paper_dataset": paper_dataset, "paper_acc": p_acc,
               "acc_diff": None if mean is None or p_acc is None else mean - p_acc, "ops_g": ops, "energy_mj": mj}
        if target == "table2":
            p_ops, p_mj = (paper.TABLE2[model][kind][:2] if model in paper.TABLE2 else (None, None))
            row.update(paper_ops_g=p_ops, paper_energy_mj=p_mj)
        rows.append(row)
    for model in dict.fromkeys(r["model"] for r in rows):
        acc = {r["kind"]: r["acc_mean"] for r in rows if r["model"] == model}
        if acc.get("binwslt") is not None and acc.get("bnn-binact") is not None:
            verdict[model] = acc["binwslt"] > acc["bnn-binact"]
    return rows, verdict


def _header(target, dataset, scale, command) -> List[str]:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    import torch

    return [f"# binwslt reproduce {target}: {dataset}, scale {scale}", "",
            f"Command: `{command or 'binwslt.reproduce.reproduce(...) (Python API)'}`  ", f"Written {now} on {platform.node()} ({platform.machine()}, "
            f"{os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}).", ""]


_DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "digits": "digits"}


def _table_markdown(target, rows, verdict, dataset, gaps) -> List[str]:
    pd = rows[0]["paper_dataset"] if rows else ""
    names = _DATASET_NAMES
    lines = []
    if dataset != pd:
        lines += [f"The paper's numbers are on {names.get(pd, pd)}, these runs on {names.get(dataset, dataset)}: "
                  "the difference column compares across datasets and is no reproduction check; the claim below "
                  "(a comparison within this run) is.", ""]
    extra = " measured OPs (G) | paper OPs (G) | measured energy (mJ) | paper energy (mJ) |" if target == "table2" \
        else " OPs (G) | energy (mJ) |"
    lines.append(f"| model | method | measured acc (%) | paper acc (%) ({names.get(pd, pd)}) | difference (points) |"
                 + extra)
    lines.append("|---" * (5 + extra.count("|")) + "|")
    for r in rows:
        cells = [r["model"], r["method"], _acc_text(r["acc_mean"], r["acc_std"], r["n"]), _num(r["paper_acc"]),
                 _signed(r["acc_diff"])]
        if target == "table2":
            cells += [_sig(r["ops_g"]), _sig(r.get("paper_ops_g")), _sig(r["energy_mj"]),
                      _sig(r.get("paper_energy_mj"))]
        else:
            cells += [_sig(r["ops_g"]), _sig(r["energy_mj"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "BinW-SLT − BNN-BinAct at r_p 0.4 (points):", "",
              "| model | measured | paper | BinW-SLT beats BNN-BinAct |", "|---|---|---|---|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        acc = {r["kind"]: r["acc_mean"] for r in rows if r["model"] == model}
        gap = None if acc.get("binwslt") is None or acc.get("bnn-binact") is None else \
            acc["binwslt"] - acc["bnn-binact"]
        held = {True: "yes", False: "no"}.get(verdict.get(model), "not measured")
        lines.append(f"| {model} | {_signed(gap)} | {_signed(gaps.get(model))} | {held} |")
    run = [m for m in verdict]
    if run:
        ok = all(verdict.values())
        lines += ["", f"**Claim (BinW-SLT beats BNN-BinAct at r_p 0.4 on every model): "
                      f"{'held' if ok else 'not held'}** for the models run ({', '.join(run)})"
                  + ("" if ok else f"; it fails on {', '.join(m for m, v in verdict.items() if not v)}") + "."]
    return lines


def _plot_table(rows, path, title) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from binwslt.sweep import _STYLE

    model_names = list(dict.fromkeys(r["model"] for r in rows))
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(model_names), 3.8), dpi=120)
    width = 0.2
    for j, kind in enumerate(KINDS):
        xs = [i + (j - 1.5) * width for i in range(len(model_names))]
        mine = {r["model"]: r for r in rows if r["kind"] == kind}
        ax.bar(xs, [mine[m]["acc_mean"] or 0.0 if m in mine else 0.0 for m in model_names], width,
               yerr=[mine[m]["acc_std"] or 0.0 if m in mine else 0.0 for m in model_names],
               color=_STYLE[kind][0], label=f"{KIND_LABELS[kind]} (measured)")
        px = [(x, mine[m]["paper_acc"]) for x, m in zip(xs, model_names) if m in mine and mine[m]["paper_acc"]]
        if px:
            ax.scatter([x for x, _ in px], [y for _, y in px], marker="_", s=300, color="black", zorder=3,
                       label=f"paper ({_DATASET_NAMES.get(rows[0]['paper_dataset'], '')})" if j == 0 else None)
    ax.set_xticks(range(len(model_names)))
    ax.set_xticklabels(model_names)
    ax.set_ylabel("Test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path) -> str:
    import matplotlib.pyplot as plt

    tmp = f"{path}.tmp{os.getpid()}.png"
    fig.savefig(tmp, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _fig_rows(target, points, runs_dir, dataset) -> List[dict]:
    rows = []
    for (model, panel, series), by_x in _grouped(points, runs_dir).items():
        for x, ms in by_x.items():
            mean, std, n = _acc_stats(ms)
            cell = next(p.cell for p in points if p.group == (model, panel, series) and p.x == x)
            p_acc = None
            if cell.command != "finetune":
                p_acc = paper.accuracy(model, cell.kind, dataset, cell.prune_rate, cell.timesteps, cell.decay)
            mj, _, _ = _stats([m.get("energy_mj") for m in ms])
            mj_pruned, _, _ = _stats([m.get("energy_mj_pruned") for m in ms])
            ops, _, _ = _stats([m.get("ops_g") for m in ms])
            rows.append({"model": model, "panel": panel, "series": series, "x": x, "kind": cell.kind,
                         "command": cell.command, "prune_rate": cell.prune_rate, "timesteps": cell.timesteps,
                         "decay": cell.decay, "n": n, "acc_mean": mean, "acc_std": std, "paper_acc": p_acc,
                         "acc_diff": None if mean is None or p_acc is None else mean - p_acc, "ops_g": ops,
                         "energy_mj": mj, "energy_mj_pruned": mj_pruned})
    return rows


PANEL_AXES = {"a": "Pruning rate r_p", "b": "Timestep T", "c": "Decay rate λ", "finetune": "Pruning rate r_p"}
_SERIES_STYLE = {"binwslt T=4": ("tab:red", "o", "-"), "binwslt T=1": ("tab:orange", "v", "-"),
                 "binwslt": ("tab:red", "o", "-"), "binwslt FT": ("tab:purple", "P", "-")}


def _series_style(series: str):
    from binwslt.sweep import _STYLE

    if series in _SERIES_STYLE:
        return _SERIES_STYLE[series]
    kind = series.split(" ")[0]
    color, marker, line = _STYLE[kind]
    if "r_p=" in series:  # several prune rates in one panel: shades by rate
        rp = float(series.split("r_p=")[1])
        shade = {0.4: 1.0, 0.5: 0.7, 0.6: 0.45}.get(rp, 0.8)
        return (matplotlib_color(color, shade), marker, "-" if kind == "binwslt" else "--")
    return color, marker, line


def matplotlib_color(color: str, shade: float):
    """``color`` blended towards white by ``1 - shade`` (shade 1: the colour itself)."""
    from matplotlib.colors import to_rgb

    r, g, b = to_rgb(color)
    return (1 - shade + shade * r, 1 - shade + shade * g, 1 - shade + shade * b)


def _label(series: str) -> str:
    kind, _, rest = series.partition(" ")
    return (KIND_LABELS.get(kind, kind) + (" " + rest if rest else "")).replace("r_p=", "r_p ")


def _draw_panel(ax, rows, panel):
    xs_all = sorted({r["x"] for r in rows if r["x"] is not None})
    lo, hi = (xs_all[0], xs_all[-1]) if xs_all else (0.0, 1.0)
    for series in dict.fromkeys(r["series"] for r in rows):
        mine = [r for r in rows if r["series"] == series and r["acc_mean"] is not None]
        if not mine:
            continue
        color, marker, line = _series_style(series)
        if mine[0]["x"] is None:
            ax.hlines(mine[0]["acc_mean"], lo, hi, colors=[color], linestyles=line if line != "-" else "--",
                      label=_label(series))
        else:
            mine.sort(key=lambda r: r["x"])
            ax.plot([r["x"] for r in mine], [r["acc_mean"] for r in mine], color=color, marker=marker,
                    linestyle=line, label=_label(series), markersize=4)
        paper_pts = [(r["x"] if r["x"] is not None else lo, r["paper_acc"]) for r in mine if r["paper_acc"]]
        if paper_pts:
            ax.scatter([x for x, _ in paper_pts], [y for _, y in paper_pts], marker="*", s=80, color=[color],
                       edgecolors="black", linewidths=0.5, zorder=3)
    ax.set_xlabel(PANEL_AXES[panel])
    if panel == "c":
        ax.invert_xaxis()
    ax.grid(True, alpha=0.3)


def _plot_fig(target, rows, path, dataset) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model_names = list(dict.fromkeys(r["model"] for r in rows))
    panels = ["a", "b", "c"] if target == "fig2" else ["energy", "finetune"]
    fig, axes = plt.subplots(len(model_names), len(panels), figsize=(4.6 * len(panels), 3.2 * len(model_names)),
                             dpi=110, squeeze=False)
    for i, model in enumerate(model_names):
        for j, panel in enumerate(panels):
            ax = axes[i][j]
            mine = [r for r in rows if r["model"] == model and r["panel"] == panel]
            if panel == "energy":
                base = next((r["energy_mj"] for r in mine if r["kind"] == "ann"), None)
                labels, vals = [], []
                for r in mine:
                    if r["energy_mj"] is not None and base:
                        labels.append(KIND_LABELS[r["kind"]])
                        vals.append(r["energy_mj"] / base)
                        if r["kind"] == "binwslt" and r["energy_mj_pruned"] is not None:
                            labels.append("BinW-SLT\n(pruned skipped)")
                            vals.append(r["energy_mj_pruned"] / base)
                ax.bar(labels, vals, color=["tab:gray", "tab:green", "tab:red", "salmon"][:len(vals)])
                ax.set_ylabel("Compute energy / ANN's")
                ax.set_title(f"{model}: normalised compute energy", fontsize=9)
                ax.tick_params(axis="x", labelsize=7)
                continue
            _draw_panel(ax, mine, panel)
            ax.set_ylabel("Test accuracy (%)")
            ax.set_title(f"{model} ({panel})" if target == "fig2" else f"{model}: fine-tuning", fontsize=9)
            ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=7)
    fig.suptitle(f"binwslt reproduce {target} on {dataset} (stars: the paper's printed values)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _fig_markdown(target, rows, dataset) -> List[str]:
    lines = []
    if target == "fig2":
        lines += ["The paper draws Fig. 2 as curves without printed values; its only numbers at these settings are "
                  "Table 1's (r_p 0.4, T 4, λ 0.99, CIFAR-10), shown as the paper column where they apply.", ""]
    else:
        lines += ["The paper draws Fig. 3 without printed values; it states an energy saving of up to "
                  f"{paper.ENERGY_SAVING_VS_SNN}x against the dense SNN and {paper.ENERGY_SAVING_VS_ANN}x against "
                  "the ANN.", ""]
    lines += ["| model | panel | series | x | measured acc (%) | paper acc (%) | difference | energy (mJ) |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['panel']} | {_label(r['series'])} | "
                     f"{'—' if r['x'] is None else _fmt(r['x'])} | {_acc_text(r['acc_mean'], r['acc_std'], r['n'])} "
                     f"| {_num(r['paper_acc'])} | {_signed(r['acc_diff'])} | {_sig(r['energy_mj'])} |")
    if target == "fig3":
        lines += ["", "Energy saving of BinW-SLT at r_p 0.4 (its energy with every synapse counted; in brackets with "
                      "pruned synapses skipped):", "",
                  "| model | ANN / BinW-SLT | paper (up to) | SNN / BinW-SLT | paper (up to) |", "|---|---|---|---|---|"]
        for model in dict.fromkeys(r["model"] for r in rows):
            mine = [r for r in rows if r["model"] == model and r["panel"] == "energy"]
            e = {r["kind"]: r["energy_mj"] for r in mine}
            ep = next((r["energy_mj_pruned"] for r in mine if r["kind"] == "binwslt"), None)

            def ratio(k):
                if not e.get(k) or not e.get("binwslt"):
                    return "—"
                return f"{e[k] / e['binwslt']:.2f}x" + (f" ({e[k] / ep:.2f}x)" if ep else "")
            lines.append(f"| {model} | {ratio('ann')} | {paper.ENERGY_SAVING_VS_ANN}x | {ratio('snn')} | "
                         f"{paper.ENERGY_SAVING_VS_SNN}x |")
    return lines


def _write_csv(rows: Sequence[dict], path: str) -> str:
    names = list(dict.fromkeys(k for r in rows for k in r))
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: "" if v is None else v for k, v in r.items()})
    os.replace(tmp, path)
    return path


def _write_text(text: str, path: str) -> str:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def aggregate(target: str, points: Sequence[Point], out_dir: str, dataset: str, scale: str = "paper",
              command: str = "", outcomes: Optional[Dict[str, Outcome]] = None) -> Report:
    """Write ``OUT/<target>.md``, ``.csv`` and ``.png`` from the cells' metrics.json files under ``OUT/runs``.

    Cells without finished metrics show as "—" (and as failed, with their error, in the Markdown when
    ``outcomes`` says so). Returns a :class:`Report`.
    """
    runs_dir = os.path.join(out_dir, "runs")
    report = Report(target, outcomes=dict(outcomes or {}))
    base = os.path.join(out_dir, target)
    lines = _header(target, dataset, scale, command)
    if target in ("table1", "table2"):
        report.rows, report.verdict = _table_rows(target, points, runs_dir, dataset)
        gaps = paper.TABLE1_GAP if target == "table1" else paper.TABLE2_GAP
        lines += _table_markdown(target, report.rows, report.verdict, dataset, gaps)
        report.png_path = _plot_table(report.rows, base + ".png",
                                      f"binwslt reproduce {target} on {dataset} (bars) vs the paper (lines)")
    else:
        report.rows = _fig_rows(target, points, runs_dir, dataset)
        lines += _fig_markdown(target, report.rows, dataset)
        report.png_path = _plot_fig(target, report.rows, base + ".png", dataset)
    if report.failed:
        lines += ["", f"{len(report.failed)} run(s) failed:", ""]
        lines += [f"- `{o.key}`: {o.error}" for o in report.failed]
    lines += ["", f"Runs: `{runs_dir}` (one folder per cell, each with its metrics.json).", ""]
    report.md_path = _write_text("\n".join(lines), base + ".md")
    report.csv_path = _write_csv(report.rows, base + ".csv")
    return report


# ------------------------------------------------------------------------------------------------ entry point


def _check_list(name, values, allowed=None, kind=str) -> list:
    if isinstance(values, str):
        values = [v.strip() for v in values.split(",") if v.strip()]
    values = list(values)
    if not values:
        raise ValueError(f"{name} must not be empty")
    out = []
    for v in values:
        if kind is int:
            try:
                iv = int(v)
            except (TypeError, ValueError):
                raise ValueError(f"{name}: {v!r} is not an integer") from None
            if isinstance(v, bool) or iv < 0 or (isinstance(v, float) and v != iv):
                raise ValueError(f"{name}: {v!r} is not an integer >= 0")
            v = iv
        elif allowed is not None and v not in allowed:
            raise ValueError(f"{name}: {v!r} is not one of {', '.join(allowed)}")
        out.append(v)
    if len(set(out)) != len(out):
        raise ValueError(f"{name} must be distinct, got {values!r}")
    return out


def reproduce(target: str, dataset: Optional[str] = None, data_dir: str = "./data", models: Optional[Sequence] = None,
              seeds: Sequence[int] = (0,), scale: str = "paper", out: Optional[str] = None, engine: str = "auto",
              address: Optional[str] = None, cpus_per_run: float = 1.0, gpus_per_run: Optional[float] = None,
              run_args: Optional[dict] = None, progress: bool = True, command: str = "") -> Report:
    """Run ``target``'s grid (skipping finished cells, resuming interrupted ones) and write its table or figure.

    ``dataset`` default: CIFAR-100 for table2, CIFAR-10 otherwise; ``models`` default: the paper's for the
    target; ``seeds``: one run per seed per cell; ``scale``: "paper" or "quick"; ``out``: default
    ``runs/reproduce/<dataset>-<scale>``; ``engine``: "auto" (Ray if installed), "ray" or "local";
    ``address``: an existing Ray cluster; ``run_args``: further RunConfig fields for every cell (device, backend,
    threads, download, ...). Returns the :class:`Report`; its ``failed`` lists the cells that failed.
    """
    from binwslt import train
    from binwslt.data import check_dataset_name
    from binwslt.rundir import check_out

    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}; got {target!r}")
    dataset = check_dataset_name(dataset or DEFAULT_DATASET[target])
    models = _check_list("models", DEFAULT_MODELS[target] if models is None else models, MODEL_NAMES)
    seeds = _check_list("seeds", seeds, kind=int)
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}; got {scale!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    for name, value in (("cpus_per_run", cpus_per_run), ("gpus_per_run", gpus_per_run)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value < 0 or (name == "cpus_per_run"
                                                                               and value <= 0)):
            raise ValueError(f"{name} must be a {'positive' if name == 'cpus_per_run' else 'non-negative'} number, "
                             f"got {value!r}")
    run_args = dict(run_args or {})
    known = set(train.RunConfig.__dataclass_fields__)
    for name in run_args:
        if name not in known:
            raise ValueError(f"run_args has unknown field {name!r}; RunConfig fields are {sorted(known)}")
        if name in ("command", "model", "kind", "dataset", "prune_rate", "timesteps", "decay", "seed", "out",
                    "ticket", "resume", "stop_after"):
            raise ValueError(f"run_args must not set {name!r}: the grid sets it per cell")
    threads = run_args.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be an int >= 1, got {threads!r}")  # here, not once per failed cell
    sc = SCALES[scale]
    out = os.fspath(out) if out is not None else os.path.join("runs", "reproduce", f"{dataset}-{scale}")
    check_out(out)  # a file, or an unwritable folder, is one clear error before anything is written
    runs_dir = os.path.join(out, "runs")
    os.makedirs(runs_dir, exist_ok=True)
    extra = dict(sc.run, data_dir=data_dir, **run_args)
    extra.setdefault("progress", progress)
    points = grid(target, models, seeds, sc)
    cells = unique_cells(points)
    if address is None:  # fail before fanning out when the data is missing here (a cluster's nodes may differ)
        from binwslt.data import load_dataset

        load_dataset(dataset, data_dir, download=bool(run_args.get("download")))
    use_ray = engine == "ray" or address is not None or (engine == "auto" and _ray_available())
    if engine == "local" and address is not None:
        raise ValueError("address is a Ray cluster's: it needs engine='ray' or 'auto', not 'local'")
    print(f"reproduce {target} on {dataset} ({scale}): {len(cells)} runs, engine "
          f"{'ray' if use_ray else 'local'}, out {out}", flush=True)
    fields = lambda cell: cell.fields(dataset, runs_dir, extra)  # noqa: E731
    if use_ray:
        outcomes = run_ray(cells, fields, address=address, cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run)
    else:
        outcomes = run_local(cells, fields, progress=progress, threads=run_args.get("threads"))
    return aggregate(target, points, out, dataset, scale, command, outcomes)


def add_parser(sub) -> None:
    """Register ``binwslt reproduce`` on the CLI's subparsers (``cli.build_parser`` calls this)."""
    p = sub.add_parser("reproduce", help="run the paper's Table 1/2 or Fig. 2/3 grid and write it beside the paper's",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("target", choices=TARGETS)
    p.add_argument("--dataset", choices=("digits", "cifar10", "cifar100"),
                   help="default cifar100 for table2, cifar10 otherwise")
    p.add_argument("--data-dir", dest="data_dir", default="./data", help="folder with the CIFAR python batches")
    p.add_argument("--download", action="store_true", default=None, help="fetch CIFAR (MD5 checked) when missing")
    p.add_argument("--models", help="comma-separated (default: the paper's models for the target)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, one run per seed per cell (default 0)")
    p.add_argument("--scale", choices=tuple(SCALES), default="paper",
                   help="paper (default: the paper's settings) or quick (a smoke run in seconds per cell)")
    p.add_argument("--out", help="output folder (default runs/reproduce/DATASET-SCALE); rerun with the same one "
                                 "to resume")
    p.add_argument("--engine", choices=ENGINES, default="auto", help="auto (default: ray if installed), ray, local")
    p.add_argument("--address", help="an existing Ray cluster to run on (e.g. auto, ray://head:10001)")
    p.add_argument("--cpus-per-run", dest="cpus_per_run", type=float, default=1.0, help="Ray num_cpus per run")
    p.add_argument("--gpus-per-run", dest="gpus_per_run", type=float,
                   help="Ray num_gpus per run (default 1 when the cluster has GPUs, else 0)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument("--backend", choices=("auto", "torch", "reference", "triton"))
    p.add_argument("--threads", type=int, help="torch CPU threads per run (default: --cpus-per-run under Ray)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=True)


def command(args) -> dict:
    """The ``binwslt reproduce`` handler: runs :func:`reproduce` from parsed ``args``; returns a summary dict.

    Raises RuntimeError (exit status 1) after writing the results when a run failed.
    """
    run_args = {k: getattr(args, k) for k in ("device", "backend", "threads", "download")
                if getattr(args, k, None) is not None}
    report = reproduce(args.target, dataset=args.dataset, data_dir=args.data_dir, models=args.models,
                       seeds=args.seeds, scale=args.scale, out=args.out, engine=args.engine, address=args.address,
                       cpus_per_run=args.cpus_per_run, gpus_per_run=args.gpus_per_run, run_args=run_args,
                       progress=args.progress, command="binwslt " + " ".join(sys.argv[1:]))
    print(f"wrote {report.md_path}, {report.csv_path}, {report.png_path}", flush=True)
    for model, held in report.verdict.items():
        print(f"  {model}: BinW-SLT {'beats' if held else 'does not beat'} BNN-BinAct at r_p 0.4", flush=True)
    if report.failed:
        raise RuntimeError(f"{len(report.failed)} of {len(report.outcomes)} runs failed: "
                           + "; ".join(f"{o.key}: {o.error}" for o in report.failed))
    return {"target": args.target, "md": report.md_path, "csv": report.csv_path, "png": report.png_path,
            "verdict": report.verdict}
