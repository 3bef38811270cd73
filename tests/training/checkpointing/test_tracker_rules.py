"""The tracker file and the committed ``iter_*`` directories disagree: the newest
committed checkpoint is the truth (a crash between the commit and the tracker update,
a missing tracker); a run refuses a --save directory that holds checkpoints of later
iterations than it starts from; a --load directory that does not exist is an error
unless it is also --save (the first run of a job that resumes itself).
``load_checkpoint(model, None, None)`` (evaluation, generation) loads the weights alone."""

from __future__ import annotations

import os
import shutil

import pytest

from megatron.training.checkpointing import directory as layout
from tests.training.checkpointing import load_probe
from tests.training.checkpointing.ckpt_runs import run_ckpt
from tests.multirank import RankFailure


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint root with iterations 2 and 4 committed, tracker at 4."""
    root = str(tmp_path_factory.mktemp("saved") / "ckpt")
    run_ckpt(1, ["--save", root, "--save-interval", "2"], iters=4)
    assert layout.committed_iterations(root) == [2, 4] and layout.read_tracker(root) == (4, False)
    return root


def test_newest_committed_checkpoint_wins_over_the_tracker(saved, tmp_path):
    behind = str(tmp_path / "tracker_behind")
    shutil.copytree(saved, behind)
    layout.write_tracker(behind, 2)  # the crash came after committing iter_4, before the tracker update
    missing = str(tmp_path / "tracker_missing")
    shutil.copytree(saved, missing)
    os.remove(layout.tracker_path(missing))
    typo = str(tmp_path / "no_such_dir")
    outcomes = load_probe.loaded_iterations([behind, missing, typo, saved], ["--use-checkpoint-opt-param-scheduler"],
                                            bare=(3,))
    assert outcomes[0] == (None, 4), outcomes[0]
    assert outcomes[1] == (None, 4), outcomes[1]
    error, iteration = outcomes[2]
    assert iteration is None and f"--load {typo}: no such directory" in error, error
    assert outcomes[3] == (None, 4), outcomes[3]  # load_checkpoint(model, None, None): weights only


def test_fresh_run_into_a_used_save_directory_is_refused(saved, tmp_path):
    root = str(tmp_path / "used")
    shutil.copytree(saved, root)
    with pytest.raises(RankFailure) as failure:
        run_ckpt(1, ["--save", root, "--save-interval", "2"], iters=3)
    message = str(failure.value)
    assert "holds committed checkpoints of iterations [2, 4]" in message, message
    assert f"--load {root}" in message
    assert layout.read_tracker(root) == (4, False) and layout.committed_iterations(root) == [2, 4]
