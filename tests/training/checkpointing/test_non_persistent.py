"""Global non-persistent checkpoints (--non-persistent-save-interval with
--non-persistent-ckpt-type global): where they go, which are kept (Megatron's rule: before
a new one is written, all but the newest are deleted), that --load takes one when it is at
least as new as the persistent one, and that a run resumed from one continues bit-exactly."""

from __future__ import annotations

import os
import shutil
from types import SimpleNamespace

import pytest

from megatron.training.argument_checks import check_non_persistent_checkpoints
from megatron.training.checkpointing import directory as layout
from tests.training.checkpointing.ckpt_runs import run_ckpt

NON_PERSISTENT = ["--save-interval", "3", "--non-persistent-save-interval", "2", "--non-persistent-ckpt-type", "global"]


def test_where_they_go_and_which_are_kept(tmp_path):
    root = str(tmp_path / "save")
    run_ckpt(2, ["--save", root] + NON_PERSISTENT, iters=8)
    # persistent: every 3 and the end; non-persistent: every 2 unless a persistent save is
    # due, the one before the newest kept until the newest is written
    assert layout.committed_iterations(root) == [3, 6, 8]
    other = os.path.join(root, "non_persistent")
    assert layout.committed_iterations(other) == [4, 8]
    assert layout.read_tracker(root)[0] == 8 and layout.read_tracker(other)[0] == 8


def test_own_directory(tmp_path):
    root, other = str(tmp_path / "save"), str(tmp_path / "elsewhere")
    run_ckpt(1, ["--save", root, "--non-persistent-global-ckpt-dir", other] + NON_PERSISTENT, iters=4)
    assert layout.committed_iterations(other) == [2, 4] and layout.committed_iterations(root) == [3, 4]
    assert not os.path.exists(os.path.join(root, "non_persistent"))


def test_resume_from_a_newer_non_persistent_checkpoint_is_exact(tmp_path):
    straight = run_ckpt(2, ["--save", str(tmp_path / "straight")] + NON_PERSISTENT, iters=8)
    root = str(tmp_path / "crashed")
    # Killed after iteration 5 before any persistent save past 3: what stays on disk is the
    # persistent 3 and the non-persistent 2 and 4 (the exit's own save of 5 is removed).
    run_ckpt(2, ["--save", root, "--exit-interval", "5"] + NON_PERSISTENT, iters=8)
    shutil.rmtree(layout.iteration_dir(root, 5))
    layout.write_tracker(root, 3)
    # Without --non-persistent-ckpt-type the loader reads the persistent tracker alone.
    assert min(run_ckpt(2, ["--load", root], iters=8).losses) == 4
    resumed = run_ckpt(2, ["--save", root, "--load", root] + NON_PERSISTENT, iters=8)
    assert min(resumed.losses) == 5  # it went on from the non-persistent 4, not the persistent 3
    assert {i: h for i, h in straight.losses.items() if i > 4} == resumed.losses


def _args(**flags):
    base = dict(non_persistent_save_interval=None, non_persistent_ckpt_type=None, save="/ckpt",
                non_persistent_local_ckpt_dir=None, replication=False, replication_jump=None)
    return SimpleNamespace(**{**base, **flags})


@pytest.mark.parametrize("flags,message", [
    (dict(non_persistent_save_interval=2), "add --non-persistent-ckpt-type global"),
    (dict(non_persistent_save_interval=2, non_persistent_ckpt_type="global", save=None), "add --save DIR"),
    (dict(non_persistent_save_interval=0, non_persistent_ckpt_type="global"), "must be a positive integer"),
])
def test_bad_flags_are_named(flags, message):
    with pytest.raises(ValueError, match=message):
        check_non_persistent_checkpoints(_args(**flags))
    check_non_persistent_checkpoints(_args(non_persistent_save_interval=2, non_persistent_ckpt_type="global"))
    # local and in_memory: tests/training/checkpointing/test_local_non_persistent.py
