"""Runs are never clobbered (issue #13): locked folders, refused non-empty folders, unique default folders,
--out checked before any work, checksummed checkpoints, temp files of interrupted writes cleaned up."""
import os
import subprocess
import sys
import textwrap

import pytest
from helpers import one_line_error

from binwslt import cli, rundir, train
from binwslt.train import RunConfig

TINY = ["--width", "0.125", "-T", "2", "--epochs", "1", "--batch-size", "16", "--max-steps", "1",
        "--eval-batch-size", "32", "--eval-batches", "1", "--backend", "torch"]


def _quick(out, **kw):
    base = dict(width=0.125, timesteps=2, epochs=1, batch_size=16, max_steps=1, eval_batches=1,
                eval_batch_size=32, backend="torch", progress=False, out=str(out))
    base.update(kw)
    return RunConfig(**base)




@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("safety") / "run"
    train.run(_quick(out))
    return out


def test_a_locked_folder_is_refused_naming_the_holder(tmp_path, capsys):
    folder = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from binwslt.rundir import RunLock
        lock = RunLock({str(folder)!r})
        print("locked", flush=True)
        sys.stdin.readline()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(rundir.RunFolderError, match=f"in use by process {holder.pid}"):
            rundir.RunLock(str(folder))
        assert cli.main(["find", *TINY, "--no-progress", "--out", str(folder)]) == 2
        err = one_line_error(capsys, "find")
        assert f"in use by process {holder.pid}" in err
        assert sorted(os.listdir(folder)) == [rundir.LOCK_NAME]  # nothing was written into the busy folder
    finally:
        holder.communicate("\n", timeout=60)
    # the holder exited: its lock is stale and is taken over; the lock file names the new holder
    with rundir.RunLock(str(folder)):
        assert open(folder / rundir.LOCK_NAME).read().split()[0] == str(os.getpid())


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    folder = tmp_path / "stale"
    folder.mkdir()
    (folder / rundir.LOCK_NAME).write_text("999999999 elsewhere\n")
    run = train.run(_quick(folder))
    assert run.metrics["epochs"] == 1


def test_a_non_empty_folder_needs_resume_or_overwrite(finished, tmp_path, capsys):
    with pytest.raises(rundir.RunFolderError, match="already holds files"):
        train.run(_quick(finished, seed=3))
    before = os.path.getmtime(finished / "metrics.json")
    assert cli.main(["find", *TINY, "--no-progress", "--seed", "3", "--out", str(finished)]) == 2
    assert "--overwrite to replace it" in one_line_error(capsys, "find")
    assert os.path.getmtime(finished / "metrics.json") == before  # the previous run is untouched
    other = tmp_path / "other"
    other.mkdir()
    (other / "checkpoint.pt").write_bytes(b"old")
    (other / "notes.txt").write_text("mine")
    assert cli.main(["find", *TINY, "--no-progress", "--overwrite", "--out", str(other)]) == 0
    assert train.load_checkpoint(str(other / "checkpoint.pt"))["config"]["overwrite"] is True
    assert (other / "notes.txt").read_text() == "mine"  # only the run's own outputs are replaced


def test_default_out_is_unique_per_run_with_a_latest_link(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["find", *TINY, "--no-progress"]) == 0
    assert cli.main(["find", *TINY, "--no-progress", "--seed", "1"]) == 0
    runs = sorted(p for p in os.listdir("runs") if p != "latest")
    assert runs == ["find-conv4-binwslt-digits-001", "find-conv4-binwslt-digits-002"]
    assert os.readlink("runs/latest") == "find-conv4-binwslt-digits-002"
    assert train.load_checkpoint("runs/latest/checkpoint.pt")["config"]["seed"] == 1
    assert train.load_checkpoint("runs/find-conv4-binwslt-digits-001/checkpoint.pt")["config"]["seed"] == 0
    assert "run folder runs/find-conv4-binwslt-digits-002" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["file", "under-file"])
def test_out_is_checked_before_any_work(tmp_path, monkeypatch, capsys, case):
    import binwslt.train as train_module
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" if case == "file" else tmp_path / "f" / "run"

    def no_data(*args, **kwargs):
        raise AssertionError("the data was read before --out was checked")
    monkeypatch.setattr(train_module, "load_dataset", no_data)
    for command in (["find", *TINY], ["train", "--kind", "ann", *TINY]):
        assert cli.main([*command, "--out", str(out)]) == 2
        err = one_line_error(capsys, command[0])
        assert ("is a file" if case == "file" else "lies under the file") in err
    with pytest.raises(rundir.RunFolderError):
        train.run(_quick(out))


def test_unwritable_out_is_refused(tmp_path):
    """A folder this process cannot write is refused before any work. Root writes through any mode bits, so as
    root (CI) the folder is made immutable (``chattr +i``), which stops root too."""
    import subprocess
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o500)
    immutable = os.geteuid() == 0
    if immutable:
        made = subprocess.run(["chattr", "+i", str(locked)], capture_output=True, text=True)
        if made.returncode != 0:
            pytest.skip(f"root and chattr +i refused here: {made.stderr.strip()}")
    try:
        with pytest.raises(rundir.RunFolderError, match="not writable"):
            rundir.check_out(str(locked / "run"))
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(locked)], check=True)
        locked.chmod(0o700)


@pytest.mark.parametrize("damage", ["empty", "flipped byte", "truncated", "foreign"])
def test_corrupt_checkpoint_on_resume_is_one_line(finished, tmp_path, capsys, damage):
    import shutil
    out = tmp_path / "damaged"
    shutil.copytree(finished, out)
    path = out / "checkpoint.pt"
    data = bytearray(path.read_bytes())
    if damage == "empty":
        data = b""
    elif damage == "flipped byte":
        data[len(data) // 2] ^= 0x01
    elif damage == "truncated":
        data = data[: len(data) - 100]
    else:
        import io
        import torch
        buffer = io.BytesIO()
        torch.save({"format": "binwslt-checkpoint"}, buffer)  # a plain torch file, without the checksum header
        data = buffer.getvalue()
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checkpoint"):
        train.load_checkpoint(str(path))
    assert cli.main(["find", "--resume", "--out", str(out)]) == 2
    err = one_line_error(capsys, "find")
    assert str(path) in err and ("corrupt" in err or "empty" in err or "checksum" in err)


def test_temp_files_of_an_interrupted_write_are_cleaned_on_the_next_start(finished, tmp_path):
    import shutil
    out = tmp_path / "interrupted"
    shutil.copytree(finished, out)
    leftovers = [".checkpoint.pt.k2j3h4.tmp", "ticket.safetensors.tmp12345", ".metrics.json.abc.tmp"]
    for name in leftovers:
        (out / name).write_bytes(b"\0" * 1000)
    (out / "keep.tmp.txt").write_text("not a temp file of ours")
    train.run(_quick(out, resume=True))  # another folder: a moved run resumes too
    names = set(os.listdir(out))
    assert not names & set(leftovers)
    assert "keep.tmp.txt" in names


def test_checkpoint_round_trip_verifies_its_checksum(tmp_path):
    import torch
    path = str(tmp_path / "c.pt")
    state = {"format": train.CHECKPOINT_FORMAT, "x": torch.arange(5)}
    train.save_checkpoint(path, state)
    assert open(path, "rb").read().startswith(train.CHECKPOINT_MAGIC)
    assert torch.equal(train.load_checkpoint(path)["x"], torch.arange(5))


def test_progress_bars_only_on_a_terminal(tmp_path, capfd):
    # stderr is captured (not a terminal): no bar is drawn, the per-epoch line is still printed
    train.run(_quick(tmp_path / "bars", progress=True))
    out, err = capfd.readouterr()
    assert "epoch 1/1: train loss" in out
    assert "it/s" not in err and "\r" not in err


def test_empty_training_batches_are_skipped(tmp_path, monkeypatch):
    import torch
    from binwslt import data
    original = data.Dataset.loader

    def with_empty_batches(self, split, batch_size, **kw):
        loader = original(self, split, batch_size, **kw)
        if split != "train":
            return loader

        class Wrapped:
            def __len__(self):
                return len(loader)

            def set_epoch(self, epoch):
                loader.set_epoch(epoch)

            def __iter__(self):
                for x, y in loader:
                    yield x[:0], y[:0]
                    yield x, y
        return Wrapped()
    monkeypatch.setattr(data.Dataset, "loader", with_empty_batches)
    result = train.run(_quick(tmp_path / "empty", max_steps=3))
    for name, buf in result.model.named_buffers():
        if "running" in name:
            assert torch.isfinite(buf).all(), name
