"""The CPU extension's build cache: keyed by source, never hanging on a lock left by a dead process."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from binwslt import _cpu_ext

TINY = "#include <pybind11/pybind11.h>\nPYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def(\"answer\", [] { return 42; }); }\n"

BUILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from binwslt import _cpu_ext
    module = _cpu_ext.build_extension("binwslt_test_tiny", [Path(sys.argv[1])], cflags=["-O0"], ldflags=[])
    print("answer", module.answer())
""")


def _env(root):
    return dict(os.environ, TORCH_EXTENSIONS_DIR=str(root), BINWSLT_EXT_WAIT="120")


def _compiler_available():
    from torch.utils.cpp_extension import get_cxx_compiler
    import shutil
    return shutil.which(get_cxx_compiler()) is not None


@pytest.mark.skipif(not _compiler_available(), reason="no C++ compiler")
def test_build_killed_midway_leaves_nothing_that_blocks_the_next(tmp_path):
    source = tmp_path / "tiny.cpp"
    source.write_text(TINY)
    root = tmp_path / "ext"
    name = f"binwslt_test_tiny_{_cpu_ext.build_key([source], ['-O0'])}"
    lock = root / "binwslt" / name / "build.lock"
    first = subprocess.Popen([sys.executable, "-c", BUILD, str(source)], env=_env(root), stderr=subprocess.PIPE,
                             stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not lock.exists():  # the lock appears when the build starts
        assert first.poll() is None, first.stderr.read().decode()
        assert time.monotonic() < deadline, "the first build never started"
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert lock.exists(), "the killed build must leave its lock behind for this test to mean anything"
    assert not (lock.parent / f"{name}.so").exists()
    second = subprocess.run([sys.executable, "-c", BUILD, str(source)], env=_env(root), capture_output=True,
                            text=True, timeout=180)
    assert second.returncode == 0, second.stderr
    assert "answer 42" in second.stdout
    assert "building the CPU extension" in second.stderr  # the one-line notice
    third = subprocess.run([sys.executable, "-c", BUILD, str(source)], env=_env(root), capture_output=True,
                           text=True, timeout=180)
    assert "answer 42" in third.stdout and "building" not in third.stderr  # cached: no rebuild
    assert not lock.exists()


def test_live_lock_holder_is_waited_on_for_a_bounded_time(tmp_path, monkeypatch):
    source = tmp_path / "tiny.cpp"
    source.write_text(TINY)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    name = f"binwslt_test_tiny_{_cpu_ext.build_key([source], ['-O0'])}"
    lock = tmp_path / "binwslt" / name / "build.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(str(os.getpid()))  # a live holder: this very process
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="building"):
        _cpu_ext.build_extension("binwslt_test_tiny", [source], cflags=["-O0"], ldflags=[], wait_s=0.5)
    assert time.monotonic() - start < 10
    assert lock.exists()  # a live holder's lock is never taken away


def test_build_key_follows_the_source(tmp_path):
    a, b = tmp_path / "a.cpp", tmp_path / "b.cpp"
    a.write_text(TINY)
    b.write_text(TINY + "// changed\n")
    assert _cpu_ext.build_key([a], ["-O3"]) != _cpu_ext.build_key([b], ["-O3"])
    assert _cpu_ext.build_key([a], ["-O3"]) != _cpu_ext.build_key([a], ["-O0"])
    assert _cpu_ext.build_key([a], ["-O3"]) == _cpu_ext.build_key([a], ["-O3"])
