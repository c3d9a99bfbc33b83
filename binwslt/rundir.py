"""Run folders that are never clobbered: checked before any work, locked while in use, named uniquely by default.

* :func:`check_out` — ``--out`` must be (or be creatable as) a writable folder; checked before any data is read.
* :class:`RunLock` — an exclusive ``fcntl.flock`` on ``OUT/.binwslt.lock`` (holding the holder's pid) for as long
  as a process uses the folder. The kernel drops the lock when its process dies, so a lock left by a dead
  process is simply taken over; a second live process gets :class:`RunFolderError` naming the holder's pid.
* :func:`clean_temp_files` — temp files of an interrupted atomic write (``.NAME.*.tmp`` from
  ``binwslt.train.atomic_write_bytes``, ``NAME.tmp<pid>`` from ``binwslt.ticket.save``), removed on the next start
  while the lock is held.
* :func:`unique_run_folder` — a new numbered folder ``PARENT/STEM-NNN`` per run and a ``PARENT/latest`` link to it.
"""
from __future__ import annotations

import errno
import os
import re
import socket
import time
from typing import List, Optional

LOCK_NAME = ".binwslt.lock"
LATEST_NAME = "latest"
_TEMP_PATTERNS = (re.compile(r"^\..+\.tmp$"), re.compile(r"^.+\.tmp\d+$"))


class RunFolderError(ValueError):
    """A run folder that cannot be used (a file, unwritable, in use by another process, not empty)."""


def check_out(path) -> str:
    """Check that ``path`` is a folder this process can write, or one it can create; return it (a str).

    Creates nothing. Raises :class:`RunFolderError` naming ``path`` when it, or a folder above it, is a file, or
    when the nearest existing folder is not writable.
    """
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise RunFolderError(f"--out must be a folder path, got {path!r}")
    path = os.fspath(path)
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        where = "is a file" if probe == os.path.abspath(path) else f"lies under the file {probe}"
        raise RunFolderError(f"--out {path} {where}: choose a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RunFolderError(f"--out {path}: {probe} is not writable")
    return path


class RunLock:
    """Exclusive lock of a run folder while this process uses it (a context manager; :meth:`release` to end it).

    ``RunLock(folder)`` creates the folder if needed and takes the lock, or raises :class:`RunFolderError` naming
    the pid of the live process that holds it. A lock whose process died is taken over.
    """

    def __init__(self, folder: str):
        import fcntl

        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        try:
            os.makedirs(folder, exist_ok=True)
            self._fd: Optional[int] = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunFolderError(f"--out {folder}: cannot create the run folder or its lock file: "
                                 f"{exc.strerror}") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = self._holder()
            os.close(self._fd)
            self._fd = None
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunFolderError(f"--out {folder}: cannot lock {self.path}: {exc.strerror}") from None
            raise RunFolderError(f"--out {folder} is in use by process {holder} (lock {self.path}); wait for it to "
                                 "finish or choose another --out") from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()} {socket.gethostname()}\n".encode())

    def _holder(self) -> str:
        """The holder's pid as written in the lock file (it writes it right after locking: wait a moment)."""
        for _ in range(20):
            with open(self.path, encoding="utf-8", errors="replace") as f:
                text = f.read().split()
            if text:
                return " on ".join(text[:2])
            time.sleep(0.05)
        return "(pid not yet written)"

    def release(self) -> None:
        """Drop the lock (the lock file stays; the next user takes it over)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor releases the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def clean_temp_files(folder: str) -> List[str]:
    """Remove the temp files interrupted atomic writes left in ``folder``; return their names. Hold the lock."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if any(p.match(name) for p in _TEMP_PATTERNS) and os.path.isfile(path):
            os.unlink(path)
            removed.append(name)
    return removed


def run_files(folder: str) -> List[str]:
    """The entries of ``folder`` other than its lock file (empty when the folder does not exist)."""
    if not os.path.isdir(folder):
        return []
    return sorted(name for name in os.listdir(folder) if name != LOCK_NAME)


def unique_run_folder(parent: str, stem: str) -> str:
    """Create and return a new folder ``parent/stem-NNN`` (the next free number) and point ``parent/latest`` at it."""
    check_out(parent)
    os.makedirs(parent, exist_ok=True)
    pattern = re.compile(re.escape(stem) + r"-(\d+)$")
    numbers = [int(m.group(1)) for m in map(pattern.match, os.listdir(parent)) if m]
    number = max(numbers, default=0) + 1
    while True:
        name = f"{stem}-{number:03d}"
        try:
            os.mkdir(os.path.join(parent, name))
            break
        except FileExistsError:  # another process took this number first
            number += 1
    link = os.path.join(parent, LATEST_NAME)
    tmp = f"{link}.{os.getpid()}.new"
    try:
        os.symlink(name, tmp)
        os.replace(tmp, link)
    except OSError:  # a file system without links: the numbered folder is what counts
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return os.path.join(parent, name)
