"""Megatron's checkpoint directory layout and the crash-safe way we publish into it.

``<root>/iter_0001000/`` holds one checkpoint, ``<root>/latest_checkpointed_iteration.txt``
names the newest (an iteration number, or ``release`` for ``<root>/release/``).

Publishing (DESIGN.md section 6): every rank writes into the sibling staging directory
``iter_0001000.partial``; once all data is durable, rank 0 writes the manifest, fsyncs,
renames the staging directory to ``iter_0001000`` (atomic), and only then replaces the
tracker file (temporary file + fsync + rename). A crash at any point leaves the previous
checkpoint and tracker intact; a ``.partial`` directory is never loaded (a later save of
the same iteration replaces it) and loading warns about it. A committed directory is
never written into.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
from typing import List, Optional, Tuple

from megatron.core.durable_files import atomic_write, fsync_directory

logger = logging.getLogger(__name__)

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
PARTIAL_SUFFIX = ".partial"
_ITER_DIR = re.compile(r"^iter_(\d{7,})$")


# Where global non-persistent checkpoints go under --save by default (Megatron's name).
NON_PERSISTENT_SUBDIR = "non_persistent"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file and the fix."""


def iteration_dir(root: str, iteration: Optional[int], release: bool = False) -> str:
    return os.path.join(root, "release" if release else f"iter_{iteration:07d}")


def staging_dir(root: str, iteration: int) -> str:
    return iteration_dir(root, iteration) + PARTIAL_SUFFIX


def tracker_path(root: str) -> str:
    return os.path.join(root, TRACKER_FILENAME)


def read_tracker(root: str) -> Tuple[Optional[int], bool]:
    """(iteration, is_release) from the tracker file; (None, False) when there is none."""
    path = tracker_path(root)
    if not os.path.isfile(path):
        return None, False
    with open(path, "rb") as handle:
        raw = handle.read(64)
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        text = None
    if text == "release":
        return 0, True
    if text is None or not text.isdigit():
        raise CheckpointError(
            f"{path}: expected an iteration number or 'release', found {raw[:32]!r}. The file is damaged: "
            f"write the iteration of a committed checkpoint into it (one of {committed_iterations(root)[-5:]}), "
            "or pass --ckpt-step N"
        )
    return int(text), False


def newest_checkpoint(root: str) -> Tuple[Optional[int], bool, Optional[str]]:
    """(iteration, is_release, warning) to load from ``root``: the newest committed
    checkpoint, whatever the tracker says. A committed ``iter_*`` directory is complete
    (it is renamed into place only after every file is durable), so when it is newer
    than the tracker the run crashed between the commit and the tracker update; loading
    the tracker's older iteration would retrain steps and, since a committed directory
    is never overwritten, never advance past them. A missing tracker beside committed
    directories is the same (an interrupted first save, or a tracker deleted by hand).
    The tracker is rewritten by the next save."""
    tracked, release = read_tracker(root)
    if release:
        return tracked, True, None
    committed = committed_iterations(root)
    if not committed or (tracked is not None and tracked >= committed[-1]):
        return tracked, False, None
    newest = committed[-1]
    seen = f"names iteration {tracked}" if tracked is not None else "is missing"
    return newest, False, (f"{tracker_path(root)} {seen} but {iteration_dir(root, newest)} is committed: "
                           f"loading iteration {newest}, the newest committed checkpoint (pass --ckpt-step N "
                           "to load another)")


def write_tracker(root: str, iteration: int) -> None:
    atomic_write(tracker_path(root), lambda handle: handle.write(f"{iteration}\n".encode("ascii")))


def committed_iterations(root: str) -> List[int]:
    """Iterations with a committed ``iter_XXXXXXX`` directory, ascending."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _ITER_DIR.match(name)
        if match and os.path.isdir(os.path.join(root, name)):
            found.append(int(match.group(1)))
    return sorted(found)


def partial_checkpoints(root: str) -> List[str]:
    return sorted(glob.glob(os.path.join(glob.escape(root), "iter_*" + PARTIAL_SUFFIX)))


def warn_about_partial_checkpoints(root: str) -> None:
    for path in partial_checkpoints(root):
        logger.warning("skipping %s: an unfinished checkpoint (the save was interrupted); it is never loaded "
                       "and is replaced when that iteration is saved again", path)


def prepare_staging(root: str, iteration: int) -> str:
    """(rank 0) An empty staging directory for ``iteration``, replacing an interrupted one."""
    os.makedirs(root, exist_ok=True)
    path = staging_dir(root, iteration)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.makedirs(path)
    return path


def commit(root: str, iteration: int) -> str:
    """(rank 0) Publish the staging directory as ``iter_XXXXXXX`` (atomic rename)."""
    staged, final = staging_dir(root, iteration), iteration_dir(root, iteration)
    fsync_directory(staged)
    os.rename(staged, final)
    fsync_directory(root)
    return final


def remove_old_checkpoints(root: str, keep_last: Optional[int], retain_interval: Optional[int],
                           protect: int) -> List[int]:
    """(rank 0, after a commit) Delete committed checkpoints that are neither among the
    newest ``keep_last`` (--keep-last-checkpoints) nor multiples of ``retain_interval``
    (--save-retain-interval, which on its own keeps only multiples and the newest).
    ``protect`` (the one just written) is never deleted. Returns the iterations removed."""
    if not keep_last and not retain_interval:
        return []
    iterations = [i for i in committed_iterations(root) if i != protect]
    # ``protect`` is one of the newest ``keep_last``; keep the keep_last - 1 before it.
    kept_newest = set(iterations[max(0, len(iterations) - (keep_last - 1)):]) if keep_last and keep_last > 1 else set()
    removable = [i for i in iterations
                 if i not in kept_newest and not (retain_interval and i % retain_interval == 0)]
    if not keep_last:
        removable = [i for i in removable if i < protect]
    for iteration in removable:
        _delete(root, iteration)
    return removable


def keep_only_newest(root: str) -> List[int]:
    """(rank 0, before a non-persistent save) Delete every committed checkpoint of ``root``
    but the newest, as Megatron does before writing the next non-persistent one: the newest
    stays until its successor is committed. Returns the iterations removed."""
    removable = committed_iterations(root)[:-1]
    for iteration in removable:
        _delete(root, iteration)
    return removable


def remove_all_but(root: str, keep: int) -> List[int]:
    """Delete every committed checkpoint of ``root`` except ``keep`` (just committed), and
    every unfinished one: a non-persistent directory holds only its newest save, also when
    an earlier run left later iterations there. Returns the iterations removed."""
    removable = [i for i in committed_iterations(root) if i != keep]
    for iteration in removable:
        _delete(root, iteration)
    for path in partial_checkpoints(root):
        shutil.rmtree(path, ignore_errors=True)
    return removable


def _delete(root: str, iteration: int) -> None:
    path = iteration_dir(root, iteration)
    # Rename first so that a crash mid-delete never leaves a half-deleted iter_ directory.
    doomed = path + ".deleting"
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)
