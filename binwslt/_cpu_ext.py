"""The fused CPU LIF scans (binwslt/csrc/lif_scan.cpp), compiled on first use with torch's cpp_extension.

``load()`` returns the extension module, or None where it cannot be built (no compiler, ``BINWSLT_NO_CPP_EXT=1``,
or another process's build did not finish in time); the torch backend then runs the same scans as eager ops.

Where it is built: one directory per source hash × torch version × Python × compiler flags, under
``$TORCH_EXTENSIONS_DIR/binwslt`` (or ``~/.cache/binwslt/extensions``), so checkouts and venvs never rebuild each
other's. A build runs in a private directory and moves the finished library into place atomically; a lock
file holding the builder's pid keeps two processes from building at once. A lock whose process is dead is
removed; a live one is waited on for at most ``BINWSLT_EXT_WAIT`` seconds (default 600), then this process
warns and uses the eager scans. Building prints one line on stderr.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

from .surrogate import SURROGATE_CODES  # noqa: F401  (the codes lif_scan.cpp branches on)

_SOURCE = Path(__file__).parent / "csrc" / "lif_scan.cpp"
_CFLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp")
_LDFLAGS = ("-fopenmp",)
_state = {}


def cache_root() -> Path:
    """The per-user directory that holds the built extensions."""
    base = os.environ.get("TORCH_EXTENSIONS_DIR")
    if base:
        return Path(base) / "binwslt"
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "binwslt" / "extensions"


def build_key(sources: Sequence[Path], cflags: Sequence[str]) -> str:
    """Hash of the sources (and the headers beside them), the compiler flags, the torch version and the Python
    (ABI) that load them."""
    import torch

    h = hashlib.sha256()
    headers = sorted({header for src in sources for header in Path(src).parent.glob("*.h")})
    for src in list(sources) + headers:  # the headers beside the sources are included by them
        h.update(Path(src).read_bytes())
    h.update(repr((tuple(cflags), torch.__version__, sys.version, sys.implementation.cache_tag)).encode())
    return h.hexdigest()[:16]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _try_lock(lock: Path) -> bool:
    """Create ``lock`` holding our pid; False if it exists. A lock whose pid is dead (or unreadable and older
    than a minute) is removed first."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            holder = int(lock.read_text().strip() or "0")
        except (OSError, ValueError):
            holder = 0
        stale = not _pid_alive(holder) if holder > 0 else _age(lock) > 60.0
        if stale:
            try:
                lock.unlink()
            except FileNotFoundError:
                pass
        return False
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _import(name: str, library: Path):
    spec = importlib.util.spec_from_file_location(name, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_extension(stem: str, sources: Sequence[Path], cflags: Sequence[str] = _CFLAGS,
                    ldflags: Sequence[str] = _LDFLAGS, wait_s: Optional[float] = None):
    """Build (once per `build_key`) and import the C++ extension made of ``sources``; returns the module.

    Raises TimeoutError when another live process holds the build lock for more than ``wait_s`` seconds
    (default ``BINWSLT_EXT_WAIT`` or 600), and whatever the compiler raises.
    """
    from torch.utils.cpp_extension import load as load_extension

    wait_s = float(os.environ.get("BINWSLT_EXT_WAIT", "600")) if wait_s is None else wait_s
    name = f"{stem}_{build_key(sources, cflags)}"
    root = cache_root() / name
    library = root / f"{name}.so"
    if library.exists():
        return _import(name, library)
    root.mkdir(parents=True, exist_ok=True)
    lock = root / "build.lock"
    deadline = time.monotonic() + wait_s
    while not _try_lock(lock):
        if library.exists():
            return _import(name, library)
        if time.monotonic() > deadline:
            raise TimeoutError(f"another process (pid in {lock}) has been building {name} for over {wait_s:.0f} s")
        time.sleep(0.2)
    try:
        if library.exists():  # finished by the process we waited for
            return _import(name, library)
        print(f"binwslt: building the CPU extension {name} (once per source, torch and Python) in {root} ...",
              file=sys.stderr, flush=True)
        private = Path(tempfile.mkdtemp(prefix=f"build-{os.getpid()}-", dir=root))
        try:
            module = load_extension(name=name, sources=[str(s) for s in sources], extra_cflags=list(cflags),
                                    extra_ldflags=list(ldflags), build_directory=str(private), verbose=False)
            os.replace(private / f"{name}.so", library)  # atomic: a library in place is always complete
        finally:
            shutil.rmtree(private, ignore_errors=True)
        return module
    finally:
        try:
            lock.unlink()
        except FileNotFoundError:
            pass


def load():
    """The compiled extension module (cached per process), or None when it is disabled or cannot be built."""
    if "module" in _state:
        return _state["module"]
    module = None
    if os.environ.get("BINWSLT_NO_CPP_EXT") != "1":
        try:
            module = build_extension("binwslt_lif_scan", [_SOURCE])
        except Exception as err:  # no compiler or headers, or a build that never finished: eager is correct
            warnings.warn(f"binwslt: the fused CPU LIF scan is not available ({str(err)[-400:]}); using eager PyTorch "
                          "ops. Set BINWSLT_NO_CPP_EXT=1 to skip the build.", RuntimeWarning)
    _state["module"] = module
    return module
