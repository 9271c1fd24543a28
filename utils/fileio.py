"""Atomic writes: every file the project writes goes to a temp file in the target's folder and
is renamed over the target with ``os.replace``, so a crash or an error mid-write leaves the
previous file (or none) and never a partial one.

``tempfile.mkstemp`` creates its file with mode 0600; the finished file gets the mode a plain
``open(path, "w")`` would give it (0666 less the umask), so outputs stay readable as usual.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

__all__ = ["atomic_open", "atomic_path", "atomic_write_text"]


def _new_file_mode() -> int:
    """0666 less the process umask. Linux states it in /proc; elsewhere it is read by setting and
    restoring it (a file another thread creates meanwhile would get umask 0)."""
    try:
        status = Path("/proc/self/status").read_text()
        umask = int(
            next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8
        )
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0)
        os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temp path beside ``path`` to write (and check) a file at; renamed to ``path`` when the
    block ends without an error, removed when it raises. Creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, _new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """``open(path, mode)`` for writing, atomically: the data reach ``path`` (flushed and
    synced) only when the block ends without an error."""
    encoding = None if "b" in mode else "utf-8"
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding) as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_open(path, "w") as handle:
        handle.write(text)
    return Path(path)
