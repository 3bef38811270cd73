"""Node-local and in-memory non-persistent checkpoints (--non-persistent-ckpt-type local /
in_memory, --replication): what each rank writes and keeps, that --load takes the newer of
the persistent and the non-persistent checkpoint (both ways) and continues bit-exactly, that
a rank missing its file falls back to the persistent checkpoint (or, with replication, gets
it from a peer), that another parallel layout is refused with a warning, and the flag errors."""

from __future__ import annotations

import os
import shutil
import sys
from types import SimpleNamespace

import pytest

from megatron.training.argument_checks import check_non_persistent_checkpoints
from megatron.training.checkpointing import directory as layout
from megatron.training.checkpointing.local_store import replication_group
from tests.multirank import run_on_ranks
from tests.training.checkpointing.ckpt_runs import run_ckpt
from tests.training.gpt_runs import TINY_GPT

TOTAL = 8


def _local(directory: str, *more: str) -> list:
    return ["--non-persistent-ckpt-type", "local", "--non-persistent-local-ckpt-dir", directory] + list(more)


def _saving(root: str, local_dir: str, *more: str) -> list:
    """Persistent every 3, local non-persistent every 2."""
    return ["--save", root, "--save-interval", "3", "--non-persistent-save-interval", "2"] + _local(local_dir, *more)


def _after(losses: dict, iteration: int) -> dict:
    return {i: h for i, h in losses.items() if i > iteration}


def _crashed_run(tmp_path, world: int, *more: str):
    """A run stopped after iteration 5 (--exit-interval): persistent 3 and 5, local 4."""
    root, local_dir = str(tmp_path / "save"), str(tmp_path / "local")
    run_ckpt(world, _saving(root, local_dir, *more) + ["--exit-interval", "5"], iters=TOTAL)
    return root, local_dir


@pytest.fixture(scope="module")
def crashed_template(tmp_path_factory):
    """One 2-rank crashed run, made once; each test works on its own copy (``crashed``)."""
    return _crashed_run(tmp_path_factory.mktemp("crashed"), 2)


@pytest.fixture
def crashed(crashed_template, tmp_path):
    copies = []
    for source in crashed_template:
        target = str(tmp_path / os.path.basename(source))
        shutil.copytree(source, target)
        copies.append(target)
    return tuple(copies)


def _forget_persistent_5(root: str) -> None:
    """As if killed before the exit's save: the persistent checkpoint is 3."""
    shutil.rmtree(layout.iteration_dir(root, 5))
    layout.write_tracker(root, 3)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The uninterrupted 2-rank run with the same saves, and its directory."""
    base = tmp_path_factory.mktemp("straight")
    return run_ckpt(2, _saving(str(base / "save"), str(base / "local")), iters=TOTAL), base


@pytest.fixture
def straight(straight_run):
    return straight_run[0]


def test_each_rank_keeps_only_its_newest(straight_run):
    _, base = straight_run
    local_dir = str(base / "local")
    for rank in (0, 1):
        rank_dir = os.path.join(local_dir, f"rank_{rank:05d}")
        # local saves at 2, 4 and 8 (a persistent one takes the place of the one due at 6)
        assert sorted(os.listdir(rank_dir)) == ["iter_0000008"]
        assert sorted(os.listdir(os.path.join(rank_dir, "iter_0000008"))) == ["local_meta.json",
                                                                                f"rank_{rank:05d}.pt"]
    assert layout.committed_iterations(str(base / "save")) == [3, 6, 8]


def test_newer_of_persistent_and_local_is_loaded(crashed, straight):
    root, local_dir = crashed
    # The persistent 5 is newer than the local 4: it is loaded.
    resumed = run_ckpt(2, ["--load", root] + _local(local_dir), iters=TOTAL)
    assert min(resumed.losses) == 6 and "older than the persistent one" in resumed.rank0_log
    assert resumed.losses == _after(straight.losses, 5)
    # Without it, the local 4 is newer than the persistent 3, and the run goes on exactly.
    _forget_persistent_5(root)
    resumed = run_ckpt(2, ["--load", root] + _local(local_dir), iters=TOTAL)
    assert "loading the local non-persistent checkpoint of iteration 4" in resumed.rank0_log
    assert resumed.losses == _after(straight.losses, 4)


def test_a_rank_without_its_file_falls_back_to_persistent(crashed, straight):
    root, local_dir = crashed
    _forget_persistent_5(root)
    shutil.rmtree(os.path.join(local_dir, "rank_00001"))  # its node was replaced
    resumed = run_ckpt(2, ["--load", root] + _local(local_dir), iters=TOTAL)
    assert "lacks the state of rank(s) [1]" in resumed.rank0_log
    assert resumed.losses == _after(straight.losses, 3)


def test_another_layout_is_refused_with_a_warning(crashed):
    root, local_dir = crashed
    _forget_persistent_5(root)
    # One rank: rank 0 still finds its file, saved with two.
    resumed = run_ckpt(1, ["--load", root] + _local(local_dir), iters=TOTAL)
    assert "only loads into the same parallel layout and world size, so it is ignored" in resumed.rank0_log
    assert "DP=2" in resumed.rank0_log and min(resumed.losses) == 4  # the persistent 3 was loaded


def test_replication_restores_a_lost_rank_from_its_partner(tmp_path, straight):
    # 2 ranks, J=1, F=2: one group {0, 1}, each rank holds both states.
    replication = ["--replication", "--replication-jump", "1"]
    root, local_dir = _crashed_run(tmp_path, 2, *replication)
    _forget_persistent_5(root)
    held = os.listdir(os.path.join(local_dir, "rank_00001", "iter_0000004"))
    assert sorted(held) == ["local_meta.json", "rank_00000.pt", "rank_00001.pt"]
    shutil.rmtree(os.path.join(local_dir, "rank_00000"))  # its node was replaced
    resumed = run_ckpt(2, ["--load", root] + _local(local_dir, *replication), iters=TOTAL)
    assert ("rank 0 has no local checkpoint file of iteration 4: restoring it from the replica on rank 1"
            in resumed.rank0_log)
    assert resumed.losses == _after(straight.losses, 4)


def test_replication_over_four_ranks_with_the_distributed_optimizer(tmp_path):
    # J=2, F=2: the groups are {0, 2} and {1, 3}.
    replication = ["--replication", "--replication-jump", "2", "--use-distributed-optimizer"]
    straight = run_ckpt(4, _saving(str(tmp_path / "s"), str(tmp_path / "sl"), *replication), iters=TOTAL)
    root, local_dir = _crashed_run(tmp_path, 4, *replication)
    _forget_persistent_5(root)
    held = os.listdir(os.path.join(local_dir, "rank_00003", "iter_0000004"))
    assert sorted(held) == ["local_meta.json", "rank_00001.pt", "rank_00003.pt"]
    os.remove(os.path.join(local_dir, "rank_00001", "iter_0000004", "rank_00001.pt"))
    resumed = run_ckpt(4, ["--load", root] + _local(local_dir, *replication), iters=TOTAL)
    assert ("rank 1 has no local checkpoint file of iteration 4: restoring it from the replica on rank 3"
            in resumed.rank0_log)
    assert resumed.losses == _after(straight.losses, 4)


def test_replication_groups():
    assert [replication_group(r, 8, 2, 2) for r in range(8)] == [
        [0, 2], [1, 3], [0, 2], [1, 3], [4, 6], [5, 7], [4, 6], [5, 7]]
    assert replication_group(5, 12, 2, 3) == [1, 3, 5]
    assert replication_group(3, 4, 1, 2) == [2, 3]


def test_the_newest_complete_iteration_is_chosen():
    from megatron.training.checkpointing.local_state import LOCAL_STATE_VERSION
    from megatron.training.checkpointing.local_store import _choose

    mine, other = {"world_size": 2}, {"world_size": 4}

    def meta(owners, saved=mine):
        return {"owners": owners, "layout": saved, "local_state_version": LOCAL_STATE_VERSION}

    # A save of 6 interrupted after rank 0 committed: 4 is the newest every rank has.
    interrupted = [{4: meta([0]), 6: meta([0])}, {4: meta([1])}]
    assert _choose(interrupted, 2, mine)[0] == 4
    assert "lacks the state of rank(s) [1]" in _choose(interrupted, 2, mine)[1][0]
    # Rank 1's own file is lost but rank 0 holds a replica of it.
    assert _choose([{4: meta([0, 1])}, {}], 2, mine) == (4, [])
    # Saved under another layout: passed over with a warning.
    iteration, notes = _choose([{4: meta([0], other)}, {4: meta([1], other)}], 2, mine)
    assert iteration is None and "world=4" in notes[0] and "world=2" in notes[0]


def _fail_once_then_resume(rank, world_size, argv, fail_at):
    """pretrain fails at iteration ``fail_at`` (an error the job catches), then is called
    again in the same process: the losses of both calls."""
    import pretrain_gpt
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator
    from megatron.core.transformer.enums import ModelType
    from megatron.training import training
    from megatron.training.global_vars import unset_global_variables

    original = training.train_step
    losses, state = [{}, {}], {"call": 0}

    def step(*args, **kwargs):
        iteration = args[-1] if len(args) >= 7 else kwargs["iteration"]
        if state["call"] == 0 and iteration == fail_at:
            raise RuntimeError("a failure the job recovers from")
        result = original(*args, **kwargs)
        losses[state["call"]][iteration] = float(result.losses["lm loss"]).hex()
        return result

    training.train_step = step
    sys.argv = ["pretrain_gpt.py"] + argv
    for call in (0, 1):
        state["call"] = call
        try:
            training.pretrain(pretrain_gpt.train_valid_test_datasets_provider, pretrain_gpt.model_provider,
                              ModelType.encoder_or_decoder, pretrain_gpt.forward_step)
        except RuntimeError as error:
            assert call == 0 and "recovers" in str(error), error
        # What a driver that restarts training in its own process resets; the process
        # groups and the in-memory checkpoint stay.
        destroy_num_microbatches_calculator()
        unset_global_variables()
    return losses


def test_in_memory_restores_within_the_process(tmp_path, straight):
    root = str(tmp_path / "save")
    argv = TINY_GPT + ["--train-iters", str(TOTAL), "--save", root, "--load", root, "--save-interval", "3",
                       "--non-persistent-save-interval", "2", "--non-persistent-ckpt-type", "in_memory"]
    first, second = run_on_ranks(_fail_once_then_resume, 2, args=(argv, 6), timeout=300)[-1]
    assert sorted(first) == [1, 2, 3, 4, 5]
    # The in-memory 4 is newer than the persistent 3.
    assert second == _after(straight.losses, 4)


def _args(**flags):
    base = dict(non_persistent_save_interval=None, non_persistent_ckpt_type=None, save="/ckpt",
                non_persistent_local_ckpt_dir=None, replication=False, replication_jump=None, replication_factor=2)
    return SimpleNamespace(**{**base, **flags})


LOCAL = dict(non_persistent_ckpt_type="local", non_persistent_local_ckpt_dir="/local")


@pytest.mark.parametrize("flags,message", [
    (dict(non_persistent_ckpt_type="local"), "add --non-persistent-local-ckpt-dir DIR"),
    (dict(non_persistent_save_interval=2), "add --non-persistent-ckpt-type global"),
    (dict(non_persistent_save_interval=2, save=None, **LOCAL), "add --save DIR"),
    (dict(non_persistent_save_interval=0, **LOCAL), "must be a positive integer"),
    (dict(replication=True, replication_jump=1), "add --non-persistent-ckpt-type local"),
    (dict(replication=True, **LOCAL), "add --replication-jump J"),
    (dict(replication=True, replication_jump=0, **LOCAL), "--replication-jump 0: must be a positive integer"),
    (dict(replication=True, replication_jump=1, replication_factor=1, **LOCAL), "--replication-factor 1"),
    (dict(replication=True, replication_jump=3, **LOCAL), "must divide the world size 4"),
])
def test_bad_flags_are_named(flags, message):
    with pytest.raises(ValueError, match=message):
        check_non_persistent_checkpoints(_args(**flags), world_size=4)


def test_good_flags_pass():
    for flags in (dict(non_persistent_save_interval=2, **LOCAL), dict(non_persistent_ckpt_type="in_memory"),
                  dict(replication=True, replication_jump=2, **LOCAL)):
        check_non_persistent_checkpoints(_args(**flags), world_size=4)
