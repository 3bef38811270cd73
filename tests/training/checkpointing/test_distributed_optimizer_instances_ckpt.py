"""Checkpoints of --num-distributed-optimizer-instances: every instance holds the same
optimizer state, and the checkpoint holds it once, in the layout-independent model space.

A run on 4 ranks with 2 instances resumes bit-exactly; its checkpoint loads into 2 ranks
with one instance (another data-parallel size and sharding) with every tensor exactly as
saved, and a checkpoint of that run loads back into 2 instances. The snapshots compared
are assembled from every rank, and assembling fails when two replicas (here, the two
instances) disagree in any bit."""

from __future__ import annotations

import glob
import math
import os

import pytest

from tests.training.checkpointing.ckpt_runs import assert_same_tensors, run_ckpt

TOTAL, SAVED_AT = 5, 3
ONE = ["--use-distributed-optimizer"]
TWO = ONE + ["--num-distributed-optimizer-instances", "2"]
FORMATS = ("torch_dist", "torch")


@pytest.fixture(scope="module")
def saved_runs(tmp_path_factory):
    """Per --ckpt-format, the uninterrupted 2-instance run (saving at SAVED_AT) and its directory."""
    cache = {}

    def get(ckpt_format: str):
        if ckpt_format not in cache:
            root = str(tmp_path_factory.mktemp(f"two_instances_{ckpt_format}"))
            flags = TWO + ["--ckpt-format", ckpt_format, "--save", root, "--save-interval", str(SAVED_AT)]
            cache[ckpt_format] = (run_ckpt(4, flags, TOTAL, snapshots=(SAVED_AT,)), root)
        return cache[ckpt_format]

    return get


def test_two_instances_resume_bit_exactly(saved_runs):
    uninterrupted, root = saved_runs("torch_dist")
    resumed = run_ckpt(4, TWO + ["--load", root, "--ckpt-step", str(SAVED_AT)], TOTAL)
    assert sorted(resumed.losses) == list(range(SAVED_AT + 1, TOTAL + 1)), resumed.log[-2000:]
    assert resumed.losses == {it: h for it, h in uninterrupted.losses.items() if it > SAVED_AT}


def test_the_instances_state_is_written_once(saved_runs):
    """Both instances hold the whole optimizer state; the checkpoint's data files hold the
    model and its state once (one copy is 1.6 MB here; a second would double it)."""
    uninterrupted, root = saved_runs("torch_dist")
    one_copy = 4 * sum(t.numel() for t in uninterrupted.snapshots[SAVED_AT].values())
    written = sum(os.path.getsize(f) for f in glob.glob(os.path.join(root, f"iter_{SAVED_AT:07d}", "*.distcp")))
    assert one_copy <= written < 1.3 * one_copy, (written, one_copy)


def _close_to(run, uninterrupted, iteration: int) -> None:
    """Another data-parallel size sums the same grads in another order (see test_reshard)."""
    got, expected = run.loss_floats()[iteration], uninterrupted.loss_floats()[iteration]
    assert math.isfinite(got) and abs(got / expected - 1) <= 1e-5, (iteration, got, expected)


@pytest.mark.parametrize("ckpt_format", ["torch_dist", "torch"])
def test_one_instance_loads_two_instances_and_back(saved_runs, tmp_path, ckpt_format):
    uninterrupted, root = saved_runs(ckpt_format)
    fmt = ["--ckpt-format", ckpt_format]
    back = str(tmp_path)
    one = run_ckpt(2, ONE + fmt + ["--load", root, "--ckpt-step", str(SAVED_AT), "--save", back,
                                   "--save-interval", "1000", "--exit-interval", str(SAVED_AT + 1)],
                   TOTAL, snapshots=("load", SAVED_AT + 1))
    assert_same_tensors(uninterrupted.snapshots[SAVED_AT], one.snapshots["load"], prefix="optimizer.state.exp_avg.")
    assert_same_tensors(uninterrupted.snapshots[SAVED_AT], one.snapshots["load"])
    _close_to(one, uninterrupted, SAVED_AT + 1)
    if ckpt_format != "torch_dist":
        return
    two = run_ckpt(4, TWO + fmt + ["--load", back, "--ckpt-step", str(SAVED_AT + 1),
                                   "--exit-interval", str(SAVED_AT + 2)], TOTAL, snapshots=("load",))
    assert_same_tensors(one.snapshots[SAVED_AT + 1], two.snapshots["load"])
    _close_to(two, uninterrupted, SAVED_AT + 2)
