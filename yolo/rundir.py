"""A training run's folder ``model/<run>/``: one writer at a time, no debris from killed writes.

The lock is ``model/<run>/.lock``, held with ``fcntl.flock`` for the life of the process and
holding the holder's pid and host: the kernel releases it when the holder dies (even by
``kill -9``), so a lock left by a dead process is taken over, with a message naming it.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import socket
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class RunLock:
    """``with RunLock(run_dir):`` holds the run folder; a second holder fails at once."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if error.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            raise FileExistsError(
                f"run folder {self.path.parent} is in use by {holder}: wait for it to finish or "
                "stop it, or use another --run"
            ) from None
        previous = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if previous:
            log.warning("took over %s from %s, which is no longer running", self.path, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing releases the flock
            self._fd = None


def remove_stale_temp_files(run_dir: Path) -> None:
    """Delete temp files of writes that a killed process left (``.<name>.*.tmp``); the caller
    holds the run's lock, so no write of its own is in progress."""
    for path in Path(run_dir).glob(".*.tmp"):
        size = path.stat().st_size
        path.unlink(missing_ok=True)
        log.info("removed %s (%.1f MB), left by an interrupted write", path, size / 1e6)


def check_writable(folder: Path, flag: str) -> None:
    """Create ``folder`` and write a file in it now, so a read-only or mistyped folder fails
    before any work, with the flag to change."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise PermissionError(
            f"cannot write to {folder} ({error.strerror}): choose another {flag}"
        ) from None


class NewFolders:
    """``with NewFolders(run_dir, log_dir) as new:``: the folders that this start creates (and
    any missing parent) are removed again at the exit unless ``new.keep()`` was called once the
    start succeeded, so a start that fails (offline weights, a bad data root) or finds nothing
    to train leaves no empty ``model/<run>/`` holding a ``.lock`` and no empty ``logs/<run>/``.
    A folder is removed only while it holds nothing but what a start writes there."""

    START_FILES = (LOCK_NAME, "config.json", "events.out.tfevents.*")

    def __init__(self, *folders: Path) -> None:
        self.created = [root for root in map(_first_missing, folders) if root is not None]

    def keep(self) -> None:
        self.created = []

    def __enter__(self) -> NewFolders:
        return self

    def __exit__(self, *exc) -> None:
        for root in self.created:
            files = [path for path in root.rglob("*") if not path.is_dir()]
            if all(any(path.match(name) for name in self.START_FILES) for path in files):
                shutil.rmtree(root, ignore_errors=True)


def _first_missing(folder: Path) -> Path | None:
    """The outermost folder of ``folder``'s path that does not exist yet (None: it exists)."""
    folder, missing = Path(folder).absolute(), None
    while not folder.exists():
        folder, missing = folder.parent, folder
    return missing
