"""The ``binwslt`` command: every subcommand on tiny settings, metrics.json, clear errors."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from binwslt import cli

TINY = ["--width", "0.125", "-T", "2", "--epochs", "1", "--batch-size", "16", "--max-steps", "2",
        "--eval-batch-size", "32", "--eval-batches", "1", "--backend", "torch", "--no-progress"]
# TINY without the model options (finetune takes those from its ticket)
TINY_RUN = TINY[4:]
REQUIRED = ("test_accuracy", "prune_rate", "sparsity", "ticket_bytes", "ops_g", "energy_mj", "seconds")


def _metrics(folder):
    with open(os.path.join(folder, "metrics.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def found(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cli") / "found")
    assert cli.main(["find", *TINY, "--out", out]) == 0
    return out


def test_find_prints_summary_and_writes_metrics(found, capsys):
    metrics = _metrics(found)
    for key in REQUIRED:
        assert key in metrics, key
    assert metrics["command"] == "find" and metrics["kind"] == "binwslt" and metrics["model"] == "conv4"
    assert metrics["dataset"] == "digits" and metrics["prune_rate"] == 0.4
    assert metrics["ticket_bytes"] == os.path.getsize(os.path.join(found, "ticket.safetensors"))
    # the summary of a second (resumed, already finished) run prints the headline figures
    assert cli.main(["find", "--out", found, "--resume", "--no-progress"]) == 0
    text = capsys.readouterr().out
    for needle in ("test accuracy", "sparsity", "ticket", "energy", "metrics.json"):
        assert needle in text


def test_train_and_finetune(found, tmp_path):
    assert cli.main(["train", "--kind", "ann", *TINY, "--out", str(tmp_path / "ann")]) == 0
    ann = _metrics(tmp_path / "ann")
    assert ann["kind"] == "ann" and ann["sparsity"] == 0.0 and ann["command"] == "train"
    assert cli.main(["finetune", "--ticket", found, *TINY_RUN, "--out", str(tmp_path / "ft")]) == 0
    ft = _metrics(tmp_path / "ft")
    assert ft["command"] == "finetune" and ft["kind"] == "binwslt" and ft["config"]["ticket"] == found
    # metrics.json records the ticket's model, not the defaults finetune never used
    assert ft["config"]["width"] == 0.125 and ft["config"]["timesteps"] == 2 and ft["timesteps"] == 2


def test_eval_with_activation_maps(found, tmp_path):
    out = str(tmp_path / "eval")
    assert cli.main(["eval", found, os.path.join(found, "ticket.safetensors"), "--activations",
                     "--labels", "a,b", "--eval-batch-size", "64", "--out", out]) == 0
    metrics = _metrics(out)
    for key in REQUIRED:
        assert key in metrics, key
    assert len(metrics["models"]) == 2
    assert metrics["models"][0]["test_accuracy"] == metrics["models"][1]["test_accuracy"]
    assert os.path.getsize(os.path.join(out, "activations.png")) > 1000


def test_energy_reproduces_paper_ann_vgg11(tmp_path):
    out = str(tmp_path / "energy")
    assert cli.main(["energy", "--model", "vgg11", "--kind", "ann", "--num-classes", "100", "--batch", "2",
                     "--out", out]) == 0
    metrics = _metrics(out)
    assert 0.209 <= metrics["ops_g"] < 0.2105 and round(metrics["energy_mj"], 3) == 0.966  # paper: 0.209 G
    for key in REQUIRED:
        assert key in metrics, key


def test_energy_of_a_ticket_on_its_dataset(found, tmp_path):
    out = str(tmp_path / "energy")
    assert cli.main(["energy", found, "--dataset", "digits", "--batch", "8", "--out", out]) == 0
    metrics = _metrics(out)
    assert metrics["kind"] == "binwslt" and metrics["ops_g_pruned"] < metrics["ops_g"]
    assert metrics["ticket_bytes"] == os.path.getsize(os.path.join(found, "ticket.safetensors"))


def test_sweep_writes_csv_and_png(tmp_path):
    out = str(tmp_path / "sweep")
    assert cli.main(["sweep", "--param", "prune-rate", "--values", "0.3,0.9", "--kinds", "binwslt,ann",
                     *TINY, "--out", out]) == 0
    assert os.path.isfile(os.path.join(out, "sweep-prune-rate.csv"))
    assert os.path.getsize(os.path.join(out, "sweep-prune-rate.png")) > 1000
    metrics = _metrics(out)
    assert len(metrics["rows"]) == 3  # binwslt at two rates, ann once (prune rate does not affect it)
    for key in REQUIRED:
        assert key in metrics, key


@pytest.mark.parametrize("argv, message", [
    (["find", "--model", "resnet50"], "invalid choice: 'resnet50'"),
    (["find", "--kind", "cnn"], "invalid choice: 'cnn'"),
    (["find", "--dataset", "mnist"], "invalid choice: 'mnist'"),
    (["find", "--timesteps", "0"], "expected an integer >= 1"),
    (["find", "--prune-rate", "abc"], "expected a number"),
    (["finetune"], "the following arguments are required: --ticket"),
    (["sweep", "--param", "depth", "--values", "1"], "invalid choice: 'depth'"),
])
def test_usage_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["find", "--kind", "ann", "--out", "{tmp}/x"], "find searches binary tickets"),
    (["train", "--kind", "binwslt", "--out", "{tmp}/x"], "train trains dense weights"),
    (["find", "--prune-rate", "1.5", "--out", "{tmp}/x"], r"prune_rate must be in [0, 1)"),
    (["find", "--dataset", "cifar10", "--data-dir", "{tmp}/nothing", "--out", "{tmp}/x"],
     "cifar-10-batches-py"),
    (["find", "--resume", "--out", "{tmp}/never"], "no checkpoint at"),
    (["finetune", "--ticket", "{tmp}/missing.safetensors", "--out", "{tmp}/x"], "does not exist"),
    (["eval", "{tmp}/nowhere"], "does not exist"),
    (["energy", "--model", "vgg11", "--kind", "ann", "--image-size", "8", "--out", "{tmp}/e"],
     "image_size=8 is too small for vgg11"),
    (["sweep", "--param", "timesteps", "--values", "1,x", "--out", "{tmp}/s"], "'x' is not an integer"),
    (["sweep", "--param", "prune-rate", "--values", "0.2,1.2", "--out", "{tmp}/s"], "prune-rate values must be"),
    (["sweep", "--param", "decay", "--values", "0.5", "--decay", "0.9", "--out", "{tmp}/s"],
     "--decay is the swept parameter"),
])
def test_input_errors_are_one_line_exit_2(argv, message, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.startswith(f"binwslt {argv[0]}: error: ")


def test_resume_with_conflicting_options_is_refused(found, capsys):
    assert cli.main(["find", "--out", found, "--resume", "--prune-rate", "0.7"]) == 2
    assert "was run with other settings" in capsys.readouterr().err


def test_eval_rejects_model_for_other_dataset(found, tmp_path, capsys):
    from binwslt import models, ticket
    path = str(tmp_path / "c10.safetensors")
    ticket.save(models.build("conv4", "binwslt", width=0.125, backend="torch"), path)
    assert cli.main(["eval", path, "--out", str(tmp_path / "e")]) == 2
    assert "choose --dataset" in capsys.readouterr().err


def test_console_script_and_module_entry_point():
    exe = shutil.which("binwslt") or (os.path.join(os.path.dirname(sys.executable), "binwslt")
                                      if os.path.exists(os.path.join(os.path.dirname(sys.executable), "binwslt"))
                                      else None)
    cmd = [exe, "--help"] if exe else [sys.executable, "-m", "binwslt.cli", "--help"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for sub in ("find", "train", "finetune", "eval", "energy", "sweep"):
        assert sub in proc.stdout
