"""binwslt.sweep: Fig. 2 style sweeps (real tiny runs on digits, and the bookkeeping with a stand-in trainer)."""
import io
import os
import sys

import numpy as np
import pytest

from binwslt import sweep, train

TINY = dict(model="conv4", dataset="digits", width=0.125, epochs=1, max_steps=2, eval_batches=1, progress=False,
            backend="torch")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_prune_rate_sweep_end_to_end(tmp_path, monkeypatch):
    result = sweep.run_sweep("prune-rate", [0.3, 0.7], ["binwslt", "ann"], TINY, tmp_path)
    assert [(r["kind"], r["value"], r["varied"]) for r in result.rows] == \
        [("binwslt", 0.3, True), ("binwslt", 0.7, True), ("ann", "", False)]
    for row in result.rows[:2]:
        assert row["prune_rate"] == row["value"]
        assert row["sparsity"] == pytest.approx(row["value"], abs=0.01)
        assert 0.0 <= row["test_accuracy"] <= 1.0 and row["ops_g"] > 0 and row["ticket_bytes"] > 0
        assert os.path.isfile(os.path.join(row["out"], "ticket.safetensors"))
    assert result.rows[2]["prune_rate"] == 0.0 and result.rows[2]["out"].endswith("ann-base")
    assert result.csv_path == str(tmp_path / "sweep-prune-rate.csv")
    with open(result.png_path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    back = sweep.read_csv(result.csv_path)
    assert [r["test_accuracy"] for r in back] == [r["test_accuracy"] for r in result.rows]
    assert back[2]["value"] is None and back[0]["value"] == 0.3

    # A second call reuses every finished run; one that lost its metrics resumes from its checkpoint.
    calls = []
    real_run = train.run
    monkeypatch.setattr(train, "run", lambda cfg: calls.append(cfg) or real_run(cfg))
    again = sweep.run_sweep("prune-rate", [0.3, 0.7], ["binwslt", "ann"], TINY, tmp_path)
    assert calls == [] and [r["test_accuracy"] for r in again.rows] == [r["test_accuracy"] for r in result.rows]
    os.remove(os.path.join(result.rows[1]["out"], "metrics.json"))
    sweep.run_sweep("prune-rate", [0.3, 0.7], ["binwslt", "ann"], TINY, tmp_path)
    assert len(calls) == 1 and calls[0].resume and calls[0].prune_rate == 0.7


class FakeRun:
    """Stands in for train.run: records configs and returns metrics shaped like the real ones."""

    def __init__(self):
        self.configs = []

    def __call__(self, cfg):
        cfg = cfg.resolved()
        self.configs.append(cfg)
        acc = 0.5 + 0.01 * cfg.timesteps + 0.1 * cfg.decay - 0.1 * cfg.prune_rate
        metrics = {"model": cfg.model, "kind": cfg.kind, "dataset": cfg.dataset, "test_accuracy": acc,
                   "best_test_accuracy": acc, "prune_rate": cfg.prune_rate if cfg.kind in ("binwslt", "bnn-binact")
                   else 0.0, "timesteps": cfg.timesteps, "decay": cfg.decay, "sparsity": 0.0, "ops_g": 1.0,
                   "energy_mj": 1.0, "ops_g_pruned": 1.0, "energy_mj_pruned": 1.0, "ticket_bytes": 10, "epochs": 1,
                   "seconds": 0.1, "finished": True, "config": cfg.to_dict()}
        train.write_metrics(cfg.out, metrics)
        return train.RunResult(metrics=metrics, model=None)


@pytest.mark.parametrize("param,values,varied,constant", [
    ("timesteps", [1, 2, 4], ["binwslt", "snn"], ["ann", "bnn-binact"]),
    ("decay", [0.99, 0.5, 0.2], ["binwslt", "snn"], ["ann", "bnn-binact"]),
    ("prune_rate", [0.2, 0.95], ["binwslt", "bnn-binact"], ["ann", "snn"]),
])
def test_which_kinds_vary_with_which_param(tmp_path, monkeypatch, param, values, varied, constant):
    fake = FakeRun()
    monkeypatch.setattr(train, "run", fake)
    kinds = ["ann", "snn", "bnn-binact", "binwslt"]
    result = sweep.run_sweep(param, values, kinds, {"model": "vgg9", "epochs": 3}, tmp_path)
    field = sweep.PARAMS[sweep.normalize_param(param)]
    for kind in varied:
        got = [getattr(c, field) for c in fake.configs if c.kind == kind]
        assert got == values
    for kind in constant:
        assert len([c for c in fake.configs if c.kind == kind]) == 1
    assert all(c.model == "vgg9" and c.epochs == 3 for c in fake.configs)
    assert {c.command for c in fake.configs if c.kind in ("ann", "snn")} == {"train"}
    assert {c.command for c in fake.configs if c.kind in ("binwslt", "bnn-binact")} == {"find"}
    assert len(result.rows) == len(values) * 2 + 2
    with open(result.png_path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    replot = sweep.plot_sweep(sweep.read_csv(result.csv_path), param, str(tmp_path / "again.png"))
    assert os.path.getsize(replot) > 1000


def test_changed_settings_rerun_instead_of_reuse(tmp_path, monkeypatch):
    fake = FakeRun()
    monkeypatch.setattr(train, "run", fake)
    sweep.run_sweep("timesteps", [2], ["binwslt"], {"epochs": 1}, tmp_path)
    sweep.run_sweep("timesteps", [2], ["binwslt"], {"epochs": 1}, tmp_path)
    assert len(fake.configs) == 1
    sweep.run_sweep("timesteps", [2], ["binwslt"], {"epochs": 2}, tmp_path)
    assert len(fake.configs) == 2 and fake.configs[-1].epochs == 2
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    os.rename(tmp_path, moved)  # a moved sweep folder still holds its finished runs
    result = sweep.run_sweep("timesteps", [2], ["binwslt"], {"epochs": 2}, moved)
    assert len(fake.configs) == 2 and result.rows[0]["out"].startswith(str(moved))


@pytest.mark.parametrize("args,error,match", [
    (("width", [1], ["ann"]), ValueError, "param must be one of"),
    (("timesteps", [], ["ann"]), ValueError, "values must not be empty"),
    (("timesteps", [1.5], ["ann"]), ValueError, "integers >= 1"),
    (("timesteps", [0], ["ann"]), ValueError, "integers >= 1"),
    (("prune-rate", [1.0], ["ann"]), ValueError, r"\[0, 1\)"),
    (("decay", [1.2], ["ann"]), ValueError, r"\[0, 1\]"),
    (("decay", [0.5, 0.5], ["ann"]), ValueError, "distinct"),
    (("decay", "0.5", ["ann"]), TypeError, "sequence of numbers"),
    (("decay", [0.5], ["cnn"]), ValueError, "kind must be one of"),
    (("decay", [0.5], []), ValueError, "kinds must not be empty"),
])
def test_argument_errors(tmp_path, args, error, match):
    with pytest.raises(error, match=match):
        sweep.run_sweep(*args, {}, tmp_path)


@pytest.mark.parametrize("base,match", [({"kind": "ann"}, "must not set 'kind'"),
                                        ({"decay": 0.5}, "must not set 'decay'"),
                                        ({"learning_rate": 1}, "unknown field")])
def test_base_args_errors(tmp_path, base, match):
    with pytest.raises(ValueError, match=match):
        sweep.run_sweep("decay", [0.5], ["snn"], base, tmp_path)


def test_kinds_accept_comma_string():
    assert sweep.check_kinds("binwslt,ann") == ["binwslt", "ann"]
    with pytest.raises(FileNotFoundError, match="nothere.csv"):
        sweep.read_csv("nothere.csv")


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_names_the_running_point(tmp_path, monkeypatch, capsys):
    """Issue #13: during a sweep the bars say which point runs (and a plain line per point goes to the log)."""
    fake = FakeRun()
    monkeypatch.setattr(train, "run", fake)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    sweep.run_sweep("prune-rate", [0.3, 0.7], ["binwslt", "ann"], {"epochs": 1}, tmp_path)
    bars, lines = terminal.getvalue(), capsys.readouterr().out.splitlines()
    for i, label in enumerate(["binwslt prune-rate=0.3", "binwslt prune-rate=0.7", "ann (constant in prune-rate)"]):
        assert f"[{i + 1}/3] {label}" in bars
        assert f"[{i + 1}/3] {label}" in lines
    # not a terminal, or progress off: no bar at all, the plain lines stay
    plain = io.StringIO()
    monkeypatch.setattr(sys, "stderr", plain)
    sweep.run_sweep("prune-rate", [0.3], ["binwslt"], {"epochs": 1, "progress": False}, tmp_path / "b")
    assert "[1/1]" not in plain.getvalue() and "[1/1] binwslt prune-rate=0.3" in capsys.readouterr().out


def _display_points(ax, artist):
    """Display coordinates along ``artist`` (a Line2D or the LineCollection of hlines), 50 per segment."""
    if hasattr(artist, "get_xydata"):
        segments = [artist.get_xydata()]
    else:
        segments = [np.asarray(s) for s in artist.get_segments()]
    pts = []
    for seg in segments:
        for a, b in zip(seg[:-1], seg[1:]):
            for t in np.linspace(0.0, 1.0, 50):
                pts.append(a + t * (b - a))
    return ax.transData.transform(np.asarray(pts))


def test_legend_covers_no_line(tmp_path):
    """Issue #13: the sweep plot's legend covered the SNN line. Here SNN is the lowest line, at the bottom left,
    where the legend used to sit; the legend must now lie outside the axes and over no line's point."""
    rows = [{"kind": "binwslt", "varied": True, "value": v, "test_accuracy": a, "model": "conv4",
             "dataset": "digits"} for v, a in ((0.2, 0.99), (0.5, 0.98), (0.95, 0.90))]
    rows += [{"kind": "bnn-binact", "varied": True, "value": v, "test_accuracy": a, "model": "conv4",
              "dataset": "digits"} for v, a in ((0.2, 0.97), (0.5, 0.95), (0.95, 0.85))]
    rows += [{"kind": "snn", "varied": False, "value": "", "test_accuracy": 0.80, "model": "conv4",
              "dataset": "digits"},
             {"kind": "ann", "varied": False, "value": "", "test_accuracy": 0.995, "model": "conv4",
              "dataset": "digits"}]
    import matplotlib.pyplot as plt

    fig = sweep.sweep_figure(rows, "prune-rate", [0.2, 0.5, 0.95])
    try:
        fig.canvas.draw()
        ax = fig.axes[0]
        legend = ax.get_legend().get_window_extent()
        assert not legend.overlaps(ax.get_window_extent())
        lines = list(ax.get_lines()) + list(ax.collections)
        assert len(lines) == 4
        for artist in lines:
            pts = _display_points(ax, artist)
            inside = (pts[:, 0] >= legend.x0) & (pts[:, 0] <= legend.x1) & (pts[:, 1] >= legend.y0) & \
                (pts[:, 1] <= legend.y1)
            assert not inside.any(), artist.get_label()
    finally:
        plt.close(fig)
    # the saved PNG keeps the legend (bbox_inches="tight" widens the image rather than cropping it)
    path = sweep.plot_sweep(rows, "prune-rate", str(tmp_path / "s.png"), values=[0.2, 0.5, 0.95])
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    assert img.shape[1] > img.shape[0] * 1.3
