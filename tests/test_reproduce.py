"""binwslt reproduce: the grids, the aggregated tables against the paper's numbers, resuming, failures, the CIFAR
paths on a synthetic python-batch fixture, and a tiny grid on a local 2-worker Ray cluster."""
import csv
import json
import os
import pickle

import numpy as np
import pytest

from binwslt import cli, paper, reproduce, train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png(path):
    with open(path, "rb") as f:
        return f.read(8) == PNG_MAGIC


class FakeRun:
    """Stands in for train.run: a chosen accuracy per (kind, seed), metrics shaped like the real ones."""

    def __init__(self, acc=None, fail_kind=None):
        self.configs = []
        self.acc = acc or (lambda cfg: {"ann": 0.9, "snn": 0.88, "bnn-binact": 0.80, "binwslt": 0.86}[cfg.kind]
                           + 0.01 * cfg.seed - 0.05 * (cfg.prune_rate if cfg.kind in ("bnn-binact", "binwslt")
                                                      else 0.0))
        self.fail_kind = fail_kind

    def __call__(self, cfg):
        cfg = cfg.resolved()
        self.configs.append(cfg)
        if cfg.kind == self.fail_kind:
            raise RuntimeError(f"injected failure for {cfg.kind}")
        if cfg.command == "finetune":  # the ticket's accuracy + 2 points
            assert os.path.isfile(os.path.join(cfg.ticket, "metrics.json")), "finetune ran before its ticket"
            with open(os.path.join(cfg.ticket, "metrics.json")) as f:
                acc = json.load(f)["test_accuracy"] + 0.02
        else:
            acc = self.acc(cfg)
        energy = {"ann": 1.0, "snn": 0.2, "bnn-binact": 1.0, "binwslt": 0.1}[cfg.kind]
        metrics = {"model": cfg.model, "kind": cfg.kind, "dataset": cfg.dataset, "test_accuracy": acc,
                   "best_test_accuracy": acc, "prune_rate": cfg.prune_rate, "timesteps": cfg.timesteps,
                   "decay": cfg.decay, "sparsity": 0.0, "ops_g": 2 * energy, "energy_mj": energy,
                   "ops_g_pruned": energy, "energy_mj_pruned": energy / 2, "ticket_bytes": 10, "epochs": 1,
                   "seconds": 0.1, "finished": True, "config": cfg.to_dict(), "history": []}
        train.write_metrics(cfg.out, metrics)
        return train.RunResult(metrics=metrics, model=None)


@pytest.mark.parametrize("target,models,cells", [
    ("table1", reproduce.MODEL_NAMES, 16),
    ("table2", ("vgg11", "resnet19"), 8),
    # per model: (a) 8 r_p x (binwslt T4, binwslt T1, bnn-binact) + ann + snn = 26; (b) binwslt 3 r_p x T 2/6/8
    # (T 1 and 4 are in (a)) + snn at T 1/2/6/8 = 13; (c) 3 r_p x 7 new λ + snn at 7 new λ = 28
    ("fig2", ("conv4",), 26 + 13 + 28),
    # ann, snn, binwslt at 0.4 (shared with the right panel), binwslt + FT at 0.2/0.4/0.6/0.8
    ("fig3", ("vgg9",), 2 + 4 + 4),
])
def test_paper_grids(target, models, cells):
    points = reproduce.grid(target, models, [0], reproduce.SCALES["paper"])
    unique = reproduce.unique_cells(points)
    assert len(unique) == cells and len({c.key for c in unique}) == cells
    order = [c.key for c in unique]
    for c in unique:
        if c.needs:
            assert order.index(c.needs) < order.index(c.key) and c.command == "finetune"
    assert {c.model for c in unique} == set(models)
    t1 = {(c.model, c.kind, c.prune_rate, c.timesteps, c.decay) for c in reproduce.unique_cells(
        reproduce.grid("table1", models, [0], reproduce.SCALES["paper"]))}
    assert ("conv4" if "conv4" in models else models[0], "binwslt", 0.4, 4, 0.99) in t1


def test_cell_fields_name_the_setting():
    cell = reproduce.make_cell("vgg9", "binwslt", 2, prune_rate=0.6, timesteps=1)
    f = cell.fields("cifar10", "/o/runs", {"epochs": 3})
    assert f == {"epochs": 3, "command": "find", "model": "vgg9", "kind": "binwslt", "dataset": "cifar10", "seed": 2,
                 "out": "/o/runs/vgg9-binwslt-rp0.6-T1-lam0.99-s2", "prune_rate": 0.6, "timesteps": 1, "decay": 0.99}
    ann = reproduce.make_cell("vgg9", "ann", 0, prune_rate=0.6, timesteps=8)  # settings it does not use drop out
    assert ann.key == "vgg9-ann-s0" and "prune_rate" not in ann.fields("digits", "r", {})
    ft = reproduce.finetune_cell(cell).fields("cifar10", "/o/runs", {"epochs": 3, "width": 0.5})
    assert ft["command"] == "finetune" and ft["ticket"] == "/o/runs/vgg9-binwslt-rp0.6-T1-lam0.99-s2"
    assert ft["out"].endswith("-s2-ft") and (ft["model"], ft["prune_rate"], ft["timesteps"], ft["width"]) == \
        ("vgg9", 0.6, 1, 0.5)  # the ticket's own model fields


def test_table1_local_aggregates_seeds_against_the_paper(tmp_path, monkeypatch):
    fake = FakeRun()
    monkeypatch.setattr(train, "run", fake)
    report = reproduce.reproduce("table1", dataset="digits", models=["conv4", "vgg9"], seeds=[0, 1],
                                 out=tmp_path, engine="local", progress=False)
    assert len(fake.configs) == 16 and not report.failed
    assert {o.status for o in report.outcomes.values()} == {"done"}
    rows = {(r["model"], r["kind"]): r for r in report.rows}
    binwslt = rows[("conv4", "binwslt")]
    assert binwslt["n"] == 2 and binwslt["acc_mean"] == pytest.approx(100 * (0.86 - 0.02 + 0.005))
    assert binwslt["acc_std"] == pytest.approx(100 * 0.01 / np.sqrt(2))
    assert binwslt["paper_acc"] == paper.TABLE1["conv4"]["binwslt"] == 83.65
    assert binwslt["acc_diff"] == pytest.approx(binwslt["acc_mean"] - 83.65)
    assert report.verdict == {"conv4": True, "vgg9": True}
    text = open(report.md_path, encoding="utf-8").read()
    assert "| conv4 | BinW-SLT | 84.50 ± 0.71 (n=2) | 83.65 | +0.85 |" in text
    assert "compares across datasets" in text  # digits against the paper's CIFAR-10
    assert "**Claim (BinW-SLT beats BNN-BinAct at r_p 0.4 on every model): held** for the models run" in text
    with open(report.csv_path, newline="", encoding="utf-8") as f:
        back = list(csv.DictReader(f))
    assert len(back) == 8 and float(back[0]["paper_acc"]) == paper.TABLE1["conv4"]["ann"]
    assert _png(report.png_path)

    # Run again: every cell is skipped. A cell that lost its metrics runs again, alone.
    again = reproduce.reproduce("table1", dataset="digits", models=["conv4", "vgg9"], seeds=[0, 1],
                                out=tmp_path, engine="local", progress=False)
    assert len(fake.configs) == 16 and {o.status for o in again.outcomes.values()} == {"skipped"}
    os.remove(tmp_path / "runs" / "vgg9-snn-T4-lam0.99-s1" / "metrics.json")
    reproduce.reproduce("table1", dataset="digits", models=["conv4", "vgg9"], seeds=[0, 1], out=tmp_path,
                        engine="local", progress=False)
    assert len(fake.configs) == 17 and fake.configs[-1].kind == "snn" and fake.configs[-1].seed == 1


def test_claim_not_held_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "run", FakeRun(acc=lambda cfg: 0.5 if cfg.kind == "binwslt" else 0.7))
    report = reproduce.reproduce("table1", dataset="digits", models=["conv4"], out=tmp_path, engine="local",
                                 progress=False)
    assert report.verdict == {"conv4": False}
    assert "not held** for the models run (conv4); it fails on conv4" in open(report.md_path).read()


def test_failed_run_is_reported_and_the_others_go_on(tmp_path, monkeypatch, capsys):
    fake = FakeRun(fail_kind="bnn-binact")
    monkeypatch.setattr(train, "run", fake)
    code = cli.main(["reproduce", "table1", "--dataset", "digits", "--models", "conv4,vgg9", "--engine", "local",
                     "--out", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "2 of 8 runs failed" in err and "injected failure for bnn-binact" in err
    assert len(fake.configs) == 8  # the runs after the failed ones still ran
    text = open(tmp_path / "table1.md", encoding="utf-8").read()
    assert "2 run(s) failed" in text and "`conv4-bnn-binact-rp0.4-s0`: RuntimeError: injected failure" in text
    assert "| conv4 | BNN-BinAct | — | 79.21 | — |" in text and "| conv4 | — | +5.61 | not measured |" in text


def test_fig2_and_fig3_local(tmp_path, monkeypatch):
    fake = FakeRun()
    monkeypatch.setattr(train, "run", fake)
    fig2 = reproduce.reproduce("fig2", dataset="cifar10", models=["conv4"], scale="quick", out=tmp_path,
                               engine="local", progress=False, data_dir=str(_cifar_fixture(tmp_path, "cifar10")))
    assert not fig2.failed and _png(fig2.png_path)
    a = {(r["series"], r["x"]): r for r in fig2.rows if r["panel"] == "a"}
    # the paper's value where a table prints one (r_p 0.4, T 4, λ 0.99 on CIFAR-10), none elsewhere
    assert a[("binwslt T=4", 0.4)]["paper_acc"] == 83.65 and a[("binwslt T=4", 0.8)]["paper_acc"] is None
    assert a[("binwslt T=1", 0.4)]["paper_acc"] is None and a[("snn", None)]["paper_acc"] == 83.41
    assert a[("binwslt T=4", 0.8)]["acc_mean"] == pytest.approx(100 * (0.86 - 0.04))
    b = {(r["series"], r["x"]) for r in fig2.rows if r["panel"] == "b"}
    assert b == {("binwslt r_p=0.4", 1), ("binwslt r_p=0.4", 4), ("snn", 1), ("snn", 4),
                 ("bnn-binact r_p=0.4", None), ("ann", None)}
    assert all(c.max_steps == 2 and c.epochs == 1 for c in fake.configs)  # the quick scale

    fig3 = reproduce.reproduce("fig3", dataset="cifar10", models=["conv4"], scale="quick", out=tmp_path,
                               engine="local", progress=False, data_dir=str(tmp_path / "cifar"))
    ft = [c for c in fake.configs if c.command == "finetune"]
    assert len(ft) == 2 and {os.path.basename(c.ticket) for c in ft} == {
        "conv4-binwslt-rp0.4-T4-lam0.99-s0", "conv4-binwslt-rp0.8-T4-lam0.99-s0"}
    text = open(fig3.md_path, encoding="utf-8").read()
    assert "| conv4 | 10.00x (20.00x) | 8.92x | 2.00x (4.00x) | 1.86x |" in text  # ratios of the fake energies
    right = {(r["series"], r["x"]): r["acc_mean"] for r in fig3.rows if r["panel"] == "finetune"}
    assert right[("binwslt FT", 0.8)] == pytest.approx(right[("binwslt", 0.8)] + 2.0)


@pytest.mark.parametrize("kwargs,match", [
    ({"target": "table3"}, "target must be one of"),
    ({"target": "table1", "models": ["vgg16"]}, "models: 'vgg16' is not one of"),
    ({"target": "table1", "models": []}, "models must not be empty"),
    ({"target": "table1", "seeds": ["x"]}, "seeds: 'x' is not an integer"),
    ({"target": "table1", "seeds": [0, 0]}, "seeds must be distinct"),
    ({"target": "table1", "scale": "huge"}, "scale must be one of"),
    ({"target": "table1", "engine": "dask"}, "engine must be one of"),
    ({"target": "table1", "engine": "local", "address": "auto"}, "needs engine='ray'"),
    ({"target": "table1", "cpus_per_run": 0}, "cpus_per_run must be a positive number"),
    ({"target": "table1", "run_args": {"seed": 3}}, "must not set 'seed'"),
    ({"target": "table1", "run_args": {"learning_rate": 3}}, "unknown field"),
    ({"target": "table1", "dataset": "mnist"}, "dataset must be one of"),
])
def test_argument_errors(tmp_path, kwargs, match):
    kwargs = dict({"dataset": "digits", "out": tmp_path}, **kwargs)
    with pytest.raises(ValueError, match=match):
        reproduce.reproduce(**kwargs)


def test_missing_cifar_fails_before_any_run(tmp_path, capsys):
    code = cli.main(["reproduce", "table2", "--data-dir", str(tmp_path / "none"), "--engine", "local",
                     "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "cifar100 not found" in err and not os.listdir(tmp_path / "o" / "runs")


def _cifar_fixture(root, name, n_train=40, n_test=20):
    """A tiny CIFAR in the official python-batch format (pickled dicts with b'data' and b'labels' or
    b'fine_labels'), so the CIFAR paths run without the real data."""
    spec = {"cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                        b"labels", 10),
            "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100)}[name]
    folder, train_files, test_files, key, classes = spec
    base = root / "cifar"
    os.makedirs(base / folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for files, n in ((train_files, n_train), (test_files, n_test)):
        for fname in files:
            labels = [int(v) for v in rng.integers(0, classes, n)]
            entry = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: labels,
                     b"batch_label": fname.encode()}
            with open(base / folder / fname, "wb") as f:
                pickle.dump(entry, f)
    return base


@pytest.mark.parametrize("target,name,model", [("table2", "cifar100", "vgg11"), ("table1", "cifar10", "conv4")])
def test_cifar_paths_real_tiny_runs(tmp_path, capsys, target, name, model):
    data = _cifar_fixture(tmp_path, name, n_train=24 if name == "cifar10" else 60)
    code = cli.main(["reproduce", target, "--data-dir", str(data), "--models", model, "--scale", "quick",
                     "--engine", "local", "--out", str(tmp_path / "o"), "--no-progress", "--backend", "torch",
                     "--threads", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = list(csv.DictReader(open(tmp_path / "o" / f"{target}.csv", newline="", encoding="utf-8")))
    assert [r["kind"] for r in rows] == ["ann", "snn", "bnn-binact", "binwslt"]
    for r in rows:
        assert r["dataset"] == name and 0.0 <= float(r["acc_mean"]) <= 100.0 and float(r["ops_g"]) > 0
        metrics = json.load(open(tmp_path / "o" / "runs" / next(
            d for d in os.listdir(tmp_path / "o" / "runs") if d.startswith(f"{model}-{r['kind']}-")) / "metrics.json"))
        assert metrics["dataset"] == name and metrics["config"]["max_steps"] == 2
        assert float(r["acc_mean"]) == pytest.approx(100 * metrics["test_accuracy"])
    text = open(tmp_path / "o" / f"{target}.md", encoding="utf-8").read()
    if target == "table2":
        assert "| vgg11 | BinW-SLT |" in text and "| 61.74 |" in text and "| 0.132 |" in text
        assert "compares across datasets" not in text
    assert _png(tmp_path / "o" / f"{target}.png")


def test_ray_local_cluster_two_workers(tmp_path):
    """A tiny real grid on a local Ray cluster of this machine (2 workers): one task per run, a failing run
    reported while the others finish, and the aggregated table read back from the runs' metrics.json."""
    ray = pytest.importorskip("ray")  # ray is in the test extra (setup.py); CI installs it
    # the failing cell: its run folder is a file, so its run fails when it writes its first checkpoint
    os.makedirs(tmp_path / "runs")
    (tmp_path / "runs" / "conv4-snn-T4-lam0.99-s0").write_text("not a folder")
    # two declared GPUs (none real: the runs still use the CPU), to check that each run asks for one by default
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert ray.cluster_resources()["CPU"] == 2 and ray.cluster_resources()["GPU"] == 2
        report = reproduce.reproduce("table1", dataset="digits", models=["conv4"], scale="quick", out=tmp_path,
                                     engine="auto", run_args={"backend": "torch"})
        assert ray.is_initialized()  # it used the cluster it found and left it running
    finally:
        ray.shutdown()
    status = {k: o.status for k, o in report.outcomes.items()}
    assert status == {"conv4-ann-s0": "done", "conv4-snn-T4-lam0.99-s0": "failed",
                      "conv4-bnn-binact-rp0.4-s0": "done", "conv4-binwslt-rp0.4-T4-lam0.99-s0": "done"}
    assert "conv4-snn-T4-lam0.99-s0" in report.outcomes["conv4-snn-T4-lam0.99-s0"].error  # names its folder
    for o in report.outcomes.values():
        if o.status == "done":  # one run per GPU: each task was given exactly one of the two
            assert len(o.placement["gpus"]) == 1 and o.placement["gpus"][0] in ("0", "1")
    rows = {r["kind"]: r for r in report.rows}
    for kind in ("ann", "bnn-binact", "binwslt"):
        metrics = json.load(open(tmp_path / "runs" / next(
            d for d in os.listdir(tmp_path / "runs") if d.startswith(f"conv4-{kind}-")) / "metrics.json"))
        assert metrics["finished"] and rows[kind]["acc_mean"] == pytest.approx(100 * metrics["test_accuracy"])
        assert rows[kind]["paper_acc"] == paper.TABLE1["conv4"][kind]
    assert rows["snn"]["n"] == 0 and rows["snn"]["acc_mean"] is None
    text = open(report.md_path, encoding="utf-8").read()
    assert "1 run(s) failed" in text and "| conv4 | SNN | — | 83.41 | — |" in text


def test_killed_grid_resumes_the_interrupted_run(tmp_path, monkeypatch):
    """A run stopped after its first epoch (as a killed grid leaves it: a checkpoint, unfinished metrics) is
    resumed from its checkpoint by the next reproduce call; the finished ones are not run again."""
    extra = dict(reproduce.SCALES["quick"].run, data_dir="./data", epochs=2, progress=False, backend="torch")
    runs = str(tmp_path / "runs")
    killed = reproduce.make_cell("conv4", "binwslt", 0)
    train.run(train.RunConfig(**killed.fields("digits", runs, extra), stop_after=1))
    done = reproduce.make_cell("conv4", "ann", 0)
    train.run(train.RunConfig(**done.fields("digits", runs, extra)))
    assert not json.load(open(os.path.join(runs, killed.key, "metrics.json")))["finished"]
    calls = []
    real = train.run
    monkeypatch.setattr(train, "run", lambda cfg: calls.append(cfg) or real(cfg))
    report = reproduce.reproduce("table1", dataset="digits", models=["conv4"], scale="quick", out=tmp_path,
                                 engine="local", progress=False, run_args={"epochs": 2, "backend": "torch"})
    status = {k: o.status for k, o in report.outcomes.items()}
    assert status[done.key] == "skipped" and status[killed.key] == "done"
    resumed = [c for c in calls if c.out.endswith(killed.key)]
    assert len(resumed) == 1 and resumed[0].resume and len(calls) == 3
    metrics = json.load(open(os.path.join(runs, killed.key, "metrics.json")))
    assert metrics["finished"] and [h["epoch"] for h in metrics["history"]] == [1, 2]


def test_fig3_real_finetune_runs_are_recognised_when_finished(tmp_path):
    """Real tiny runs: fine-tuning starts from its find run's ticket, and a second call skips every cell (the
    fine-tuning cells included: their recorded settings are the ticket's, which the cells ask for)."""
    kwargs = dict(dataset="digits", models=["conv4"], scale="quick", out=tmp_path, engine="local", progress=False,
                  run_args={"backend": "torch", "threads": 1})
    first = reproduce.reproduce("fig3", **kwargs)
    assert {o.status for o in first.outcomes.values()} == {"done"} and len(first.outcomes) == 6
    ft = json.load(open(tmp_path / "runs" / "conv4-binwslt-rp0.8-T4-lam0.99-s0-ft" / "metrics.json"))
    assert ft["command"] == "finetune" and ft["prune_rate"] == 0.8 and ft["finished"]
    again = reproduce.reproduce("fig3", **kwargs)
    assert {o.status for o in again.outcomes.values()} == {"skipped"}
    assert [r["acc_mean"] for r in again.rows] == [r["acc_mean"] for r in first.rows]
