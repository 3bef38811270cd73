"""Writing files so that a crash never leaves a half-written one under the final name.

``atomic_write`` writes a temporary sibling, fsyncs it, renames it over the target and
fsyncs the directory, so readers see the old file or the whole new one. Shared by the
dataset index writers and the checkpoint tracker/manifest.
"""

from __future__ import annotations

import os
import tempfile
from typing import BinaryIO, Callable


def fsync_directory(directory: str) -> None:
    """Make renames and new entries in ``directory`` durable (best effort: not every OS
    allows opening a directory)."""
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(target: str, write: Callable[[BinaryIO], object]) -> None:
    """Replace ``target`` with what ``write(file)`` writes, atomically and durably."""
    directory = os.path.dirname(os.path.abspath(target))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(target) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_directory(directory)
