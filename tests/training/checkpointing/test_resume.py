"""Resuming from a checkpoint continues bit-exactly: a run interrupted after iteration K
and resumed with --load logs the same losses (float.hex) as a run that never stopped,
for each parallel layout, both formats, --async-save, and with dropout (the RNG state is
part of the checkpoint -- without it, the resumed losses differ)."""

from __future__ import annotations

import pytest

from tests.training.checkpointing.ckpt_runs import DROPOUT, run_ckpt
from tests.multirank import RankFailure

TOTAL, SAVED_AT = 6, 3

CASES = {
    "one_process": (1, []),
    "data_parallel": (2, []),
    "tensor_parallel_torch_format": (2, ["--tensor-model-parallel-size", "2", "--ckpt-format", "torch"]),
    "pipeline_parallel_async_save": (2, ["--pipeline-model-parallel-size", "2", "--async-save"]),
    "distributed_optimizer_dropout_bf16": (2, ["--use-distributed-optimizer", "--bf16"] + DROPOUT),
    # Lion's momentum (exp_avg, no step count) through the distributed optimizer's shards
    "lion_distributed_optimizer_bf16": (1, ["--optimizer", "lion", "--use-distributed-optimizer", "--bf16"]),
}


@pytest.fixture(scope="module")
def saved_runs(tmp_path_factory):
    """Per case, the uninterrupted run (saving every SAVED_AT iterations) and its
    checkpoint directory; made on first use."""
    cache = {}

    def get(case: str):
        if case not in cache:
            world, extra = CASES[case]
            root = str(tmp_path_factory.mktemp(case))
            cache[case] = (run_ckpt(world, extra + ["--save", root, "--save-interval", str(SAVED_AT)], TOTAL), root)
        return cache[case]

    return get


def _resume(case: str, root: str, *more: str):
    world, extra = CASES[case]
    return run_ckpt(world, extra + ["--load", root, "--ckpt-step", str(SAVED_AT)] + list(more), TOTAL)


def _after_resume(losses: dict) -> dict:
    return {it: h for it, h in losses.items() if it > SAVED_AT}


@pytest.mark.parametrize("case", sorted(CASES))
def test_resume_continues_bit_exactly(saved_runs, case):
    uninterrupted, root = saved_runs(case)
    assert sorted(uninterrupted.losses) == list(range(1, TOTAL + 1))
    resumed = _resume(case, root)
    assert sorted(resumed.losses) == list(range(SAVED_AT + 1, TOTAL + 1)), resumed.log[-2000:]
    assert resumed.losses == _after_resume(uninterrupted.losses)


def test_saving_does_not_change_the_run(saved_runs):
    """The reference runs save along the way; saving must not perturb training."""
    world, extra = CASES["one_process"]
    assert run_ckpt(world, extra, TOTAL).losses == saved_runs("one_process")[0].losses


def test_resume_without_the_rng_state_differs_when_dropout_is_on(saved_runs):
    """Proves the bit-exact dropout case depends on the restored RNG state."""
    case = "distributed_optimizer_dropout_bf16"
    uninterrupted, root = saved_runs(case)
    resumed = _resume(case, root, "--no-load-rng")
    expected = _after_resume(uninterrupted.losses)
    assert sorted(resumed.losses) == sorted(expected)
    assert all(resumed.losses[it] != expected[it] for it in expected)


def test_torch_format_refuses_another_tensor_parallel_size(saved_runs):
    """Legacy per-model-parallel-rank files cannot reshard; the error names both layouts."""
    _, root = saved_runs("tensor_parallel_torch_format")
    with pytest.raises(RankFailure) as failure:
        run_ckpt(1, ["--ckpt-format", "torch", "--load", root, "--ckpt-step", str(SAVED_AT)], TOTAL)
    message = str(failure.value)
    assert "saved with layout TP=2" in message and "this run has TP=1" in message, message[-3000:]
