"""binwslt.train: find/train/finetune for a few steps, exact resume, atomic checkpoints, seeds, 2-process DDP."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from binwslt import models, train
from binwslt.train import RunConfig, run

REQUIRED_METRICS = ("test_accuracy", "prune_rate", "sparsity", "ticket_bytes", "ops_g", "energy_mj", "seconds")


def quick(tmp_path, name="run", **kw):
    """A tiny Conv-4 on digits: width 1/8, T=2, 2 optimizer steps per epoch, one test batch of 32."""
    base = dict(model="conv4", dataset="digits", width=0.125, timesteps=2, epochs=2, batch_size=16, max_steps=2,
                eval_batches=1, eval_batch_size=32, backend="torch", progress=False, out=str(tmp_path / name),
                seed=0)
    base.update(kw)
    return RunConfig(**base)


def _states(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_find_trains_scores_only_and_writes_outputs(tmp_path):
    torch.manual_seed(0)
    initial = _states(models.build("conv4", "binwslt", num_classes=10, in_channels=1, image_size=8, timesteps=2,
                                   width=0.125, backend="torch"))
    result = run(quick(tmp_path, command="find", kind="binwslt"))
    final = _states(result.model)
    for key, before in initial.items():
        if key.endswith(".weight") and key.replace(".weight", ".scores") in initial:
            assert torch.equal(final[key], before), f"{key}: frozen weights must not change"
        elif key.endswith(".scores"):
            assert not torch.equal(final[key], before), f"{key}: scores must be trained"
    out = tmp_path / "run"
    metrics = json.loads((out / "metrics.json").read_text())
    for key in REQUIRED_METRICS:
        assert key in metrics, key
    assert metrics["prune_rate"] == 0.4 and abs(metrics["sparsity"] - 0.4) < 1e-3
    assert metrics["ticket_bytes"] == os.path.getsize(out / "ticket.safetensors")
    assert metrics["ticket_bytes"] < metrics["dense_fp32_bytes"] / 2  # tiny model: JSON metadata dominates
    assert metrics["ops_g"] > 0 and metrics["energy_mj"] > 0 and metrics["ops_g_pruned"] < metrics["ops_g"]
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["epochs"] == 2 and metrics["finished"]
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert (out / "checkpoint.pt").is_file()
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


@pytest.mark.parametrize("kind", ["ann", "snn"])
def test_train_updates_dense_weights(tmp_path, kind):
    torch.manual_seed(0)
    initial = _states(models.build("conv4", kind, num_classes=10, in_channels=1, image_size=8, timesteps=2,
                                   width=0.125, backend="torch"))
    result = run(quick(tmp_path, command="train", kind=kind, epochs=1))
    final = _states(result.model)
    conv_keys = [k for k in initial if k.endswith("layer.weight")]
    assert conv_keys and all(not torch.equal(final[k], initial[k]) for k in conv_keys)
    metrics = result.metrics
    assert metrics["prune_rate"] == 0.0 and metrics["sparsity"] == 0.0 and metrics["kind"] == kind
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_bnn_binact_find_runs(tmp_path):
    result = run(quick(tmp_path, command="find", kind="bnn-binact", epochs=1, optimizer="sgd"))
    assert result.metrics["kind"] == "bnn-binact" and result.metrics["ops_g"] > 0


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_resume_continues_exactly(tmp_path, optimizer):
    cfg = dict(command="find", kind="binwslt", epochs=2, optimizer=optimizer)
    full = run(quick(tmp_path, "full", **cfg))
    stopped = run(quick(tmp_path, "split", stop_after=1, **cfg))
    assert stopped.metrics["epochs"] == 1 and not stopped.metrics["finished"]
    resumed = run(quick(tmp_path, "split", resume=True, **cfg))
    assert resumed.metrics["epochs"] == 2 and resumed.metrics["finished"]
    a, b = _states(full.model), _states(resumed.model)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in full.history]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in resumed.history]


def test_resume_refuses_other_settings_or_missing_checkpoint(tmp_path):
    run(quick(tmp_path, command="find", kind="binwslt", epochs=1))
    with pytest.raises(ValueError, match="prune_rate"):
        run(quick(tmp_path, command="find", kind="binwslt", epochs=1, prune_rate=0.5, resume=True))
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*checkpoint.pt"):
        run(quick(tmp_path, "empty", command="find", kind="binwslt", resume=True))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    train.save_checkpoint(path, {"format": train.CHECKPOINT_FORMAT, "epoch": 1})

    def exploding_save(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", exploding_save)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(path, {"format": train.CHECKPOINT_FORMAT, "epoch": 2})
    monkeypatch.undo()
    assert train.load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600


def test_seed_makes_runs_repeatable(tmp_path):
    a = run(quick(tmp_path, "a", command="find", kind="binwslt", epochs=1, max_steps=1))
    b = run(quick(tmp_path, "b", command="find", kind="binwslt", epochs=1, max_steps=1))
    c = run(quick(tmp_path, "c", command="find", kind="binwslt", epochs=1, max_steps=1, seed=1))
    sa, sb, sc = _states(a.model), _states(b.model), _states(c.model)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_finetune_keeps_mask_and_trains_weights(tmp_path):
    found = run(quick(tmp_path, "found", command="find", kind="binwslt", epochs=1))
    from binwslt import ticket
    start = ticket.load(str(tmp_path / "found" / "ticket.safetensors"), backend="torch")
    tuned = run(quick(tmp_path, "tuned", command="finetune", ticket=str(tmp_path / "found"), epochs=1))
    before = {id_: layer for id_, layer in enumerate(models.subnet_layers(start))}
    after = models.subnet_layers(tuned.model)
    for i, layer in enumerate(after):
        assert torch.equal(layer.mask(), before[i].mask()), "finetune must keep the ticket's mask"
        assert torch.equal(layer.mask(), models.subnet_layers(found.model)[i].mask())
        assert torch.equal(layer.scores, before[i].scores)
    assert any(not torch.equal(layer.weight, before[i].weight) for i, layer in enumerate(after))
    assert tuned.metrics["command"] == "finetune" and (tmp_path / "tuned" / "ticket.safetensors").is_file()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(command="find", kind="ann"), ValueError, "find searches binary tickets"),
    (dict(command="train", kind="binwslt"), ValueError, "train trains dense weights"),
    (dict(command="finetune"), ValueError, "finetune needs ticket"),
    (dict(command="fit"), ValueError, "command must be one of"),
    (dict(optimizer="rmsprop"), ValueError, "optimizer must be one of adam, sgd"),
    (dict(schedule="step"), ValueError, "schedule must be one of"),
    (dict(dataset="imagenet"), ValueError, "dataset must be one of"),
    (dict(model="resnet50"), ValueError, "model must be one of"),
    (dict(epochs=0), ValueError, "epochs must be an int >= 1"),
    (dict(lr=-1.0), ValueError, "lr must be > 0"),
    (dict(prune_rate=1.0), ValueError, r"prune_rate must be in \[0, 1\)"),
    (dict(decay=1.5), ValueError, r"decay must be in \[0, 1\]"),
])
def test_config_errors(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        quick(tmp_path, **kwargs).resolved()


def test_finetune_missing_ticket_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="without ticket.safetensors"):
        run(quick(tmp_path, command="finetune", ticket=str(tmp_path)))


def test_defaults_follow_command_and_optimizer():
    cfg = RunConfig(command="find").resolved()
    assert cfg.lr == 0.1 and cfg.optimizer == "adam" and cfg.schedule == "cosine" and cfg.epochs == 10
    cfg = RunConfig(command="find", optimizer="sgd").resolved()
    assert cfg.schedule == "cosine" and cfg.lr == 0.1
    assert RunConfig(command="train", kind="snn").resolved().lr == 1e-3
    assert train.command_for_kind("bnn-binact") == "find" and train.command_for_kind("ann") == "train"


DDP_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    from binwslt.train import RunConfig, run
    out = sys.argv[1]
    result = run(RunConfig(command="find", model="conv4", kind="binwslt", dataset="digits", width=0.125,
                           timesteps=2, epochs=1, batch_size=16, max_steps=3, eval_batches=1, eval_batch_size=16,
                           backend="torch", progress=False, out=out, seed=0))
    rank = int(os.environ["RANK"])
    state = {k: v for k, v in result.model.state_dict().items()}
    state.update({f"mask.{i}": l.mask() for i, l in enumerate(__import__("binwslt.models").models.subnet_layers(result.model))})
    torch.save(state, os.path.join(out, f"rank{rank}.pt"))
""")


def test_ddp_two_cpu_processes_hold_identical_scores_and_masks(tmp_path):
    script = tmp_path / "ddp_find.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(models.__file__)))] + sys.path))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(out)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = torch.load(out / "rank0.pt", weights_only=True)
    r1 = torch.load(out / "rank1.pt", weights_only=True)
    scores = [k for k in r0 if k.endswith("scores")]
    masks = [k for k in r0 if k.startswith("mask.")]
    assert scores and masks
    for key in scores + masks:
        assert torch.equal(r0[key], r1[key]), key
    # the scores were trained (the ranks agree because DDP averaged the gradients, not because nothing moved)
    torch.manual_seed(0)
    fresh = models.build("conv4", "binwslt", num_classes=10, in_channels=1, image_size=8, timesteps=2, width=0.125,
                         backend="torch").state_dict()
    assert not torch.equal(fresh[scores[0]], r0[scores[0]])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2


def test_fused_optimizer_step_refreshes_the_subnet_cache():
    """torch's fused steps (the CPU default here) leave the version counter alone; `_step` bumps it, so the
    layer's cached subnet follows the new scores."""
    from binwslt.nn import BinWConv2dLIF
    from binwslt.subnet import ternary_subnet
    from binwslt.train import _step

    torch.manual_seed(0)
    layer = BinWConv2dLIF(2, 8, 3, padding=1, timesteps=2, backend="torch")
    layer.weight.requires_grad_(False)
    x = torch.randn(1, 2, 5, 5)
    optimizer = torch.optim.Adam([layer.scores], lr=0.5, fused=True)
    before = layer._subnet(x, "torch").ternary.clone()
    layer(x).sum().backward()
    _step(optimizer, [layer.scores])
    want = ternary_subnet(layer.weight, layer.scores, layer.prune_rate)[0]
    assert not torch.equal(want, before), "the step must change the mask for this test to mean anything"
    assert torch.equal(layer._subnet(x, "torch").ternary, want)
