"""Checkpoints written by Megatron-LM itself load here, in both formats and into other
parallel layouts, with Megatron's logits; training continues from them."""

import math

import pytest

from tests.training.checkpointing.ckpt_runs import run_ckpt
from tests.training.checkpointing.megatron_cases import FIXTURE, FIXTURE_FLAGS, assert_megatron_logits, needs_fixture


@needs_fixture
@pytest.mark.parametrize("fmt, world, extra, iterations", [
    ("torch", 1, ["--finetune"], [1, 2]),
    ("torch_dist", 2, ["--tensor-model-parallel-size", "2", "--use-checkpoint-args"], [11, 12]),
    ("torch", 2, ["--pipeline-model-parallel-size", "2"], [11, 12]),
])
def test_megatron_checkpoint_loads_with_megatrons_logits_and_trains_on(fmt, world, extra, iterations):
    """--load of the fixture (iteration 10; with --finetune iteration 0) gives Megatron's
    logits from the weights as loaded into TP1, TP2 or PP2, then trains two iterations.
    (A plain --load into TP1 is test_megatron_save's first step.)"""
    run = run_ckpt(world, FIXTURE_FLAGS + ["--load", str(FIXTURE / fmt)] + extra,
                   iters=iterations[-1], snapshots=("load",))
    assert_megatron_logits(run.snapshots["load"])
    assert sorted(run.losses) == iterations
    assert all(math.isfinite(loss) for loss in run.loss_floats().values())
