"""Parameter sweeps in the style of the paper's Fig. 2: accuracy against prune rate, timesteps or decay rate.

``run_sweep(param, values, kinds, base_args, out_dir)`` runs ``binwslt.train.run`` once per (kind, value) for
the kinds the parameter affects, and once for each kind it does not affect (drawn as a horizontal baseline,
as the paper draws ANN and SNN in Fig. 2a):

| param | varied for | constant (one run) |
|---|---|---|
| ``prune-rate`` | binwslt, bnn-binact | ann, snn |
| ``timesteps`` | binwslt, snn | ann, bnn-binact |
| ``decay`` | binwslt, snn | ann, bnn-binact |

Each run writes its own folder ``out_dir/<kind>-<param>-<value>`` (``<kind>-base`` for a constant kind); a run
whose folder already holds finished metrics with the same settings is reused, and one that stopped part way is
resumed from its checkpoint, so an interrupted sweep continues where it stopped. The results go to
``out_dir/sweep-<param>.csv`` (one row per run) and ``out_dir/sweep-<param>.png``.
"""
from __future__ import annotations

import csv
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

PARAMS = {"prune-rate": "prune_rate", "timesteps": "timesteps", "decay": "decay"}
KIND_LABELS = {"ann": "ANN", "snn": "SNN", "bnn-binact": "BNN-BinAct", "binwslt": "BinW-SLT"}
PARAM_LABELS = {"prune-rate": "Pruning rate", "timesteps": "Timestep T", "decay": "Decay rate λ"}
_VARIED_FOR = {"prune-rate": ("binwslt", "bnn-binact"), "timesteps": ("binwslt", "snn"),
               "decay": ("binwslt", "snn")}
_STYLE = {"binwslt": ("tab:red", "o", "-"), "bnn-binact": ("tab:blue", "s", "-"),
          "snn": ("tab:green", "^", "--"), "ann": ("tab:gray", "D", ":")}
CSV_FIELDS = ("param", "value", "kind", "varied", "model", "dataset", "prune_rate", "timesteps", "decay",
              "test_accuracy", "best_test_accuracy", "sparsity", "ops_g", "energy_mj", "ops_g_pruned",
              "energy_mj_pruned", "ticket_bytes", "epochs", "seconds", "out")


@dataclass
class SweepResult:
    """What :func:`run_sweep` returns: one dict per run (the CSV's rows, fields ``CSV_FIELDS``) and the paths."""

    rows: List[dict] = field(default_factory=list)
    csv_path: str = ""
    png_path: str = ""


def normalize_param(param: str) -> str:
    """``"prune-rate"``, ``"timesteps"`` or ``"decay"`` (``prune_rate`` accepted); ValueError otherwise."""
    if isinstance(param, str) and param.replace("_", "-") in PARAMS:
        return param.replace("_", "-")
    raise ValueError(f"param must be one of {', '.join(PARAMS)}; got {param!r}")


def check_values(param: str, values: Iterable) -> List:
    """The sweep values as a list of floats (ints for timesteps), each checked for ``param``."""
    param = normalize_param(param)
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"values must be a sequence of numbers, got {values!r}")
    values = list(values)
    if not values:
        raise ValueError("values must not be empty")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{param} values must be finite numbers, got {v!r}")
        if param == "timesteps":
            if int(v) != v or v < 1:
                raise ValueError(f"timesteps values must be integers >= 1, got {v!r}")
            v = int(v)
        elif param == "prune-rate" and not 0.0 <= v < 1.0:
            raise ValueError(f"prune-rate values must be in [0, 1), got {v!r}")
        elif param == "decay" and not 0.0 <= v <= 1.0:
            raise ValueError(f"decay values must be in [0, 1], got {v!r}")
        out.append(float(v) if param != "timesteps" else v)
    if len(set(out)) != len(out):
        raise ValueError(f"values must be distinct, got {values!r}")
    return out


def check_kinds(kinds: Iterable[str]) -> List[str]:
    """The kinds as a list, each one of ann, snn, bnn-binact, binwslt; ValueError otherwise."""
    if isinstance(kinds, str):
        kinds = [k for k in kinds.split(",") if k]
    kinds = list(kinds)
    if not kinds:
        raise ValueError("kinds must not be empty")
    for kind in kinds:
        if kind not in KIND_LABELS:
            raise ValueError(f"kind must be one of {', '.join(KIND_LABELS)}; got {kind!r}")
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"kinds must be distinct, got {kinds!r}")
    return kinds


def _format_value(value) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def finished_metrics(out: str, config: dict) -> Optional[dict]:
    """The run's metrics when ``out`` holds a finished run with the same settings, else None."""
    from .train import METRICS_NAME, RESUME_FREE_FIELDS

    path = os.path.join(out, METRICS_NAME)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        metrics = json.load(f)
    stored = metrics.get("config", {})
    # "out" may differ when a sweep folder was moved; the metrics found in it belong to it all the same.
    same = all(stored.get(k) == v for k, v in config.items() if k not in RESUME_FREE_FIELDS and k != "out")
    return metrics if same and metrics.get("finished") else None


def run_or_resume(config_fields: dict) -> dict:
    """Run one cell (fields of ``binwslt.train.RunConfig``, ``out`` its own folder) and return its metrics.

    A folder that already holds finished metrics with the same settings is reused without running; one holding a
    checkpoint is resumed from it (a checkpoint from other settings is replaced by a fresh run). Used by the
    sweeps and by ``binwslt reproduce``.
    """
    from . import train

    cfg = train.RunConfig(**config_fields).resolved()
    reused = finished_metrics(cfg.out, cfg.to_dict())
    if reused is not None:
        return reused
    if os.path.isfile(os.path.join(cfg.out, train.CHECKPOINT_NAME)):
        cfg.resume = True
    else:
        cfg.overwrite = True  # a cell's folder belongs to its sweep: what an earlier definition left is replaced
    try:
        return train.run(cfg).metrics
    except ValueError as exc:
        if not cfg.resume or "different settings" not in str(exc):
            raise
        # A checkpoint from other settings (a sweep redefined in the same folder): start this run afresh.
        cfg.resume, cfg.overwrite = False, True
        return train.run(cfg).metrics


def run_sweep(param: str, values: Sequence, kinds: Sequence[str], base_args: Optional[dict] = None,
              out_dir: str = "runs/sweep") -> SweepResult:
    """Sweep ``param`` ("prune-rate", "timesteps" or "decay") over ``values`` for each of ``kinds``.

    ``base_args``: fields of ``binwslt.train.RunConfig`` shared by every run (model, dataset, epochs, width, ...;
    not ``command``, ``kind``, ``out`` or the swept field). Kinds the parameter does not affect run once at the
    base settings. Writes ``out_dir/sweep-<param>.csv`` and ``.png`` and returns a :class:`SweepResult`.
    """
    from . import train

    param = normalize_param(param)
    values = check_values(param, values)
    kinds = check_kinds(kinds)
    base_args = dict(base_args or {})
    field_name = PARAMS[param]
    known = set(train.RunConfig.__dataclass_fields__)
    for name in base_args:
        if name not in known:
            raise ValueError(f"base_args has unknown field {name!r}; RunConfig fields are {sorted(known)}")
        if name in ("command", "kind", "out", "resume", field_name, "ticket"):
            raise ValueError(f"base_args must not set {name!r}: the sweep sets it per run")
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a folder path, got {out_dir!r}")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)

    points = []
    for kind in kinds:
        varied = kind in _VARIED_FOR[param]
        for value in (values if varied else [None]):
            fields = dict(base_args, command=train.command_for_kind(kind), kind=kind)
            if value is None:
                fields["out"] = os.path.join(out_dir, f"{kind}-base")
                label = f"{kind} (constant in {param})"
            else:
                fields[field_name] = value
                fields["out"] = os.path.join(out_dir, f"{kind}-{param}-{_format_value(value)}")
                label = f"{kind} {param}={_format_value(value)}"
            points.append((kind, varied, value, label, fields))
    rows: List[dict] = []
    with point_bar(len(points), base_args.get("progress", True), f"sweep {param}") as bar:
        for i, (kind, varied, value, label, fields) in enumerate(points):
            announce(bar, i, len(points), label)
            metrics = run_or_resume(fields)
            bar.update(1)
            rows.append(_row(param, value, kind, varied, metrics, fields["out"]))
            write_csv(rows, os.path.join(out_dir, f"sweep-{param}.csv"))
    csv_path = os.path.join(out_dir, f"sweep-{param}.csv")
    png_path = os.path.join(out_dir, f"sweep-{param}.png")
    plot_sweep(rows, param, png_path, values=values)
    return SweepResult(rows=rows, csv_path=csv_path, png_path=png_path)


def point_bar(total: int, show: bool, title: str):
    """The outer progress bar of a grid of ``total`` runs (a sweep's points, a reproduction's cells).

    Shown only when ``show`` and stderr is a terminal (``disable=None``); each run's own epoch bar sits below it.
    Use with :func:`announce`, which names the running point on the bar and in a plain line.
    """
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=title, disable=None if show else True, position=0, leave=True,
                dynamic_ncols=True, unit="run")


def announce(bar, index: int, total: int, label: str) -> None:
    """Name run ``index`` (0-based) of ``total`` on ``bar`` and in one stdout line (which logs keep)."""
    from tqdm.auto import tqdm

    text = f"[{index + 1}/{total}] {label}"
    bar.set_description_str(text)
    tqdm.write(text, file=sys.stdout)


def _row(param, value, kind, varied, metrics, out) -> dict:
    config = metrics.get("config", {})
    row = {"param": param, "value": value if value is not None else "", "kind": kind, "varied": varied,
           "model": metrics.get("model"), "dataset": metrics.get("dataset"),
           "prune_rate": metrics.get("prune_rate"), "timesteps": metrics.get("timesteps"),
           "decay": metrics.get("decay", config.get("decay")), "out": out}
    for name in ("test_accuracy", "best_test_accuracy", "sparsity", "ops_g", "energy_mj", "ops_g_pruned",
                 "energy_mj_pruned", "ticket_bytes", "epochs", "seconds"):
        row[name] = metrics.get(name)
    return row


def write_csv(rows: Sequence[dict], path: str) -> str:
    """Write ``rows`` (dicts with ``CSV_FIELDS``) to ``path`` atomically; returns the path."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    os.replace(tmp, path)
    return path


def read_csv(path: str) -> List[dict]:
    """Rows of a sweep CSV, with numbers parsed back (``value`` None for a constant kind's baseline row)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"sweep CSV not found: {path}")
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for raw in csv.DictReader(f):
            row: Dict = dict(raw)
            row["varied"] = raw["varied"] == "True"
            for name in ("value", "prune_rate", "timesteps", "decay", "test_accuracy", "best_test_accuracy",
                         "sparsity", "ops_g", "energy_mj", "ops_g_pruned", "energy_mj_pruned", "ticket_bytes",
                         "epochs", "seconds"):
                text = raw.get(name, "")
                row[name] = None if text in ("", "None") else float(text)
            for name in ("timesteps", "ticket_bytes", "epochs"):
                if row[name] is not None:
                    row[name] = int(row[name])
            rows.append(row)
    return rows


def plot_sweep(rows: Sequence[dict], param: str, path: str, values: Optional[Sequence] = None) -> str:
    """Draw test accuracy (%) against ``param`` for each kind, as the paper's Fig. 2; returns ``path`` (PNG).

    Rows of a varied kind become a line with markers; a constant kind's single row a horizontal dashed line
    across the swept range (``values``, default the range of the varied rows).
    """
    fig = sweep_figure(rows, param, values)
    import matplotlib.pyplot as plt

    tmp = f"{path}.tmp{os.getpid()}.png"
    fig.savefig(tmp, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def sweep_figure(rows: Sequence[dict], param: str, values: Optional[Sequence] = None):
    """The matplotlib figure :func:`plot_sweep` saves (one axes; the legend outside it, right of the plot, so
    it covers no line whatever the accuracies)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    param = normalize_param(param)
    xs_all = sorted({float(r["value"]) for r in rows if r["varied"]} | {float(v) for v in (values or [])})
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=120)
    lo, hi = (xs_all[0], xs_all[-1]) if xs_all else (0.0, 1.0)
    kinds = [k for k in KIND_LABELS if any(r["kind"] == k for r in rows)]
    for kind in kinds:
        color, marker, line = _STYLE[kind]
        mine = [r for r in rows if r["kind"] == kind and r["test_accuracy"] is not None]
        if not mine:
            continue
        label = KIND_LABELS[kind]
        if mine[0]["varied"]:
            mine.sort(key=lambda r: float(r["value"]))
            ax.plot([float(r["value"]) for r in mine], [100 * float(r["test_accuracy"]) for r in mine],
                    color=color, marker=marker, linestyle="-", label=label)
        else:
            ax.hlines(100 * float(mine[0]["test_accuracy"]), lo, hi, colors=color, linestyles=line, label=label)
    model = next((r["model"] for r in rows if r.get("model")), "")
    dataset = next((r["dataset"] for r in rows if r.get("dataset")), "")
    ax.set_xlabel(PARAM_LABELS[param])
    ax.set_ylabel("Test accuracy (%)")
    ax.set_title(f"{model} on {dataset}: accuracy vs {PARAM_LABELS[param].lower()}")
    if param == "decay":
        ax.invert_xaxis()  # the paper goes from 0.99 down to 0.2
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8)
    fig.tight_layout()
    return fig
