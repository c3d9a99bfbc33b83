"""Every CLI command with a bad argument and with a corrupt input file: one line, exit 2, no traceback."""
import json
import os
import shutil

import pytest
from helpers import one_line_error

from binwslt import cli, train

TINY = ["--width", "0.125", "-T", "2", "--epochs", "1", "--batch-size", "16", "--max-steps", "1",
        "--eval-batch-size", "32", "--eval-batches", "1", "--backend", "torch", "--no-progress"]
COMMANDS = ("find", "train", "finetune", "eval", "energy", "sweep")




@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("clierr") / "found"
    assert cli.main(["find", *TINY, "--out", str(out)]) == 0
    return out


def _corrupt_tickets(run_dir, folder):
    """Damaged copies of a real ticket: garbage, truncated, a broken header length, bad metadata, a lost tensor."""
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    good = run_dir / "ticket.safetensors"
    data = good.read_bytes()
    folder.mkdir(exist_ok=True)
    paths = {}
    paths["garbage"] = folder / "garbage.safetensors"
    paths["garbage"].write_bytes(b"not a ticket at all" * 10)
    paths["truncated"] = folder / "truncated.safetensors"
    paths["truncated"].write_bytes(data[: len(data) // 2])
    paths["header"] = folder / "header.safetensors"
    paths["header"].write_bytes(b"\xff" * 8 + data[8:])
    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(good))
    paths["metadata"] = folder / "metadata.safetensors"
    save_file(tensors, str(paths["metadata"]), metadata=dict(meta, config="{not json"))
    paths["config"] = folder / "config.safetensors"
    save_file(tensors, str(paths["config"]), metadata=dict(meta, config=json.dumps({"name": "conv4"})))
    paths["tensor"] = folder / "tensor.safetensors"
    save_file({k: v for i, (k, v) in enumerate(sorted(tensors.items())) if i != 0}, str(paths["tensor"]),
              metadata=meta)
    return paths


def test_corrupt_tickets_give_one_line_in_eval_energy_finetune(run_dir, tmp_path, capsys):
    for kind, path in _corrupt_tickets(run_dir, tmp_path / "bad").items():
        for argv in (["eval", str(path), "--out", str(tmp_path / "e")],
                     ["energy", str(path), "--out", str(tmp_path / "n")],
                     ["finetune", "--ticket", str(path), *TINY[4:], "--out", str(tmp_path / f"ft-{kind}")]):
            assert cli.main(argv) == 2, (kind, argv[0])
            err = one_line_error(capsys, argv[0])
            assert str(path) in err, (kind, err)


@pytest.mark.parametrize("command", ["find", "train"])
def test_corrupt_checkpoint_on_resume(run_dir, tmp_path, capsys, command):
    out = tmp_path / command
    if command == "find":
        shutil.copytree(run_dir, out)
    else:
        assert cli.main(["train", "--kind", "ann", *TINY, "--out", str(out)]) == 0
    path = out / "checkpoint.pt"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    assert cli.main([command, "--resume", "--out", str(out)]) == 2
    err = one_line_error(capsys, command)
    assert str(path) in err and "corrupt" in err


def test_corrupt_checkpoint_in_a_sweep_cell(tmp_path, capsys):
    out = tmp_path / "sweep"
    cell = out / "ann-base"
    cell.mkdir(parents=True)
    (cell / "checkpoint.pt").write_bytes(b"\0" * 64)
    assert cli.main(["sweep", "--param", "prune-rate", "--values", "0.4", "--kinds", "ann", *TINY,
                     "--out", str(out)]) == 2
    err = one_line_error(capsys, "sweep")
    assert str(cell / "checkpoint.pt") in err


def test_finetune_refuses_options_it_would_ignore(run_dir, tmp_path, capsys):
    for option in (["--model", "vgg11"], ["--prune-rate", "0.7"], ["--timesteps", "8"], ["--kind", "bnn-binact"],
                   ["--decay", "0.5"]):
        assert cli.main(["finetune", "--ticket", str(run_dir), *option, *TINY[4:],
                         "--out", str(tmp_path / "ft")]) == 2
        err = one_line_error(capsys, "finetune")
        assert "finetune takes the model" in err and option[0] in err
    assert not os.path.exists(tmp_path / "ft")
    with pytest.raises(ValueError, match="would be ignored"):
        train.finetune(ticket=str(run_dir), prune_rate=0.7, epochs=1, max_steps=1, backend="torch",
                       progress=False, out=str(tmp_path / "lib"))


@pytest.mark.parametrize("argv", [
    ["find", *TINY, "--backend", "triton"],
    ["train", "--kind", "snn", *TINY, "--backend", "triton"],
    ["finetune", "--ticket", "{run}", *TINY[4:], "--backend", "triton"],
    ["eval", "{run}", "--backend", "triton"],
    ["energy", "{run}", "--backend", "triton"],
    ["sweep", "--param", "timesteps", "--values", "2", "--kinds", "binwslt", *TINY, "--backend", "triton"],
])
def test_triton_without_a_gpu_says_it_needs_cuda(run_dir, tmp_path, monkeypatch, capsys, argv):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    argv = [a.replace("{run}", str(run_dir)) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "o")]
    assert cli.main(argv) == 2
    assert "needs CUDA tensors" in one_line_error(capsys, argv[0])


def test_energy_of_a_run_measures_its_test_images_and_says_so(run_dir, tmp_path, capsys):
    out = tmp_path / "energy"
    assert cli.main(["energy", str(run_dir), "--batch", "32", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "measured on the first 32 test images of digits" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["input"] == "test images" and metrics["dataset"] == "digits" and metrics["images"] == 32
    # the same figure find reported on the same images (its first test batch of --eval-batch-size 32)
    found = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["energy_mj"] == pytest.approx(found["energy_mj"], rel=1e-9)
    assert cli.main(["energy", str(run_dir), "--batch", "32", "--random-input", "--out", str(out)]) == 0
    assert "random N(0, 1) images" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["input"] == "randn"


def test_energy_with_path_refuses_model_options(run_dir, tmp_path, capsys):
    assert cli.main(["energy", str(run_dir), "--model", "vgg11", "--out", str(tmp_path / "e")]) == 2
    assert "drop the model options" in one_line_error(capsys, "energy")


@pytest.mark.parametrize("command", COMMANDS)
def test_out_that_is_a_file_is_refused_by_every_command(run_dir, tmp_path, capsys, command):
    bad = tmp_path / "file"
    bad.write_text("x")
    argv = {"find": ["find", *TINY], "train": ["train", "--kind", "ann", *TINY],
            "finetune": ["finetune", "--ticket", str(run_dir), *TINY[4:]], "eval": ["eval", str(run_dir)],
            "energy": ["energy", str(run_dir)],
            "sweep": ["sweep", "--param", "timesteps", "--values", "2", "--kinds", "ann", *TINY]}[command]
    assert cli.main([*argv, "--out", str(bad)]) == 2
    assert "is a file" in one_line_error(capsys, command)


def test_export_bad_arguments_and_corrupt_tickets_are_one_line(run_dir, tmp_path, capsys):
    nir_file = str(tmp_path / "out.nir")
    for argv, needle in ((["export", str(tmp_path / "nosuch"), "--nir", nir_file], "does not exist"),
                         (["export", str(run_dir), "--nir", nir_file, "--dt", "-1"], "dt must be"),
                         (["export", str(run_dir), "--nir", str(tmp_path)], str(tmp_path))):
        assert cli.main(argv) == 2, argv
        assert needle in one_line_error(capsys, "export")
    for kind, path in _corrupt_tickets(run_dir, tmp_path / "bad").items():
        assert cli.main(["export", str(path), "--nir", nir_file]) == 2, kind
        assert str(path) in one_line_error(capsys, "export"), kind
    assert not os.path.exists(nir_file)


def test_reproduce_bad_arguments_and_a_corrupt_cell_are_one_line(tmp_path, capsys):
    base = ["reproduce", "table1", "--dataset", "digits", "--engine", "local", "--scale", "quick",
            "--models", "conv4", "--no-progress", "--out", str(tmp_path / "grid")]
    for extra, needle in ((["--seeds", "x"], "seeds"), (["--models", "nosuch"], "nosuch"),
                          (["--cpus-per-run", "-1"], "cpus_per_run"), (["--threads", "0"], "threads")):
        assert cli.main([*base, *extra]) == 2, extra
        assert needle in one_line_error(capsys, "reproduce")
    (tmp_path / "afile").write_text("x")
    assert cli.main([*base, "--out", str(tmp_path / "afile")]) == 2
    assert "is a file" in one_line_error(capsys, "reproduce")
    assert not os.path.exists(tmp_path / "grid" / "runs" / "conv4-ann-s0")  # refused before any run started
    # a cell whose checkpoint is damaged: that run fails with the file named, the grid reports it (exit 1)
    cell = tmp_path / "grid" / "runs" / "conv4-ann-s0"
    cell.mkdir(parents=True)
    (cell / "checkpoint.pt").write_bytes(b"\0" * 64)
    from binwslt import reproduce
    report = reproduce.reproduce("table1", dataset="digits", models=["conv4"], scale="quick",
                                 out=str(tmp_path / "grid"), engine="local", progress=False,
                                 run_args={"max_steps": 1, "width": 0.125, "eval_batches": 1, "threads": 1})
    failed = {o.key: o.error for o in report.failed}
    assert "conv4-ann-s0" in failed and str(cell / "checkpoint.pt") in failed["conv4-ann-s0"], failed
