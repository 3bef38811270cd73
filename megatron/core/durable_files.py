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


def _umask() -> int:
    """The process umask. Linux reports it in /proc; elsewhere it can only be read by
    setting it (and straight back), which another thread creating a file could see."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """What ``open`` gives a new file: 0666 less the umask. Writers that create files
    0600 (``mkstemp``, safetensors) are brought back to it."""
    return 0o666 & ~_umask()


def atomic_write(target: str, write: Callable[[BinaryIO], object]) -> None:
    """Replace ``target`` with what ``write(file)`` writes, atomically and durably. The
    file gets the permissions an ordinary ``open`` would give (0666 less the umask):
    ``mkstemp`` creates 0600, which would lock a shared checkpoint's tracker and
    manifest away from the rest of a team."""
    directory = os.path.dirname(os.path.abspath(target))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(target) + ".", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, default_file_mode())
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
