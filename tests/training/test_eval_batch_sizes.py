"""--eval-micro-batch-size / --eval-global-batch-size: evaluation reads its own batch sizes
(defaulting to training's), and bad values are refused by name."""

import re

import pytest

from megatron.training.arguments import parse_and_validate
from megatron.training.data_iterators import train_valid_test_num_samples
from tests.multirank import run_on_ranks
from tests.training import gpt_runs

BASE = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
        "--max-position-embeddings 32 --micro-batch-size 2 --global-batch-size 8 --train-iters 4 "
        "--eval-interval 2 --eval-iters 3").split()


def _record_eval_calls():
    """Record the micro-batch size and count of every forward-only pass."""
    from megatron.training import evaluation

    original = evaluation.get_forward_backward_func

    def recording(*args, **kwargs):
        run = original(*args, **kwargs)

        def wrapped(**kw):
            if kw.get("forward_only"):
                _CALLS.append((kw["micro_batch_size"], kw["num_microbatches"]))
            return run(**kw)
        return wrapped

    evaluation.get_forward_backward_func = recording


_CALLS = []


def _run_recording(rank, world_size, argv):
    _record_eval_calls()
    log = gpt_runs._run_pretrain(rank, world_size, argv)
    return log, list(_CALLS)


def _validation_losses(log):
    return [float(x) for x in re.findall(r"validation loss at iteration \d+ \| lm loss value: (\S+)", log)]


def test_evaluation_uses_its_own_micro_batch_and_matches_the_default():
    argv = gpt_runs.TINY_GPT + ["--train-iters", "3", "--eval-interval", "3", "--eval-iters", "2"]
    (ref_log, ref_calls), = run_on_ranks(_run_recording, 1, args=(argv,), timeout=300)
    (log, calls), = run_on_ranks(_run_recording, 1, args=(argv + ["--eval-micro-batch-size", "4"],), timeout=300)
    assert set(ref_calls) == {(2, 4)} and set(calls) == {(4, 2)}
    # The same 8-sample batches, split differently: the token-averaged loss is the same.
    assert _validation_losses(log) == pytest.approx(_validation_losses(ref_log), rel=1e-5)
    assert len(_validation_losses(log)) == 1


def test_eval_global_batch_size_sets_the_validation_and_test_sample_counts():
    args = parse_and_validate(BASE + ["--eval-global-batch-size", "4"], world_size=1, rank=0)
    assert train_valid_test_num_samples(args) == (32, 3 * 3 * 4, 3 * 4)
    default = parse_and_validate(BASE, world_size=1, rank=0)
    assert train_valid_test_num_samples(default) == (32, 3 * 3 * 8, 3 * 8)


@pytest.mark.parametrize("extra,flag", [
    (["--eval-micro-batch-size", "3"], "--eval-global-batch-size 8"),
    (["--eval-global-batch-size", "6"], "--eval-global-batch-size 6"),
    (["--eval-micro-batch-size", "0"], "--eval-micro-batch-size 0"),
])
def test_bad_eval_batch_sizes_are_refused_by_name(extra, flag):
    with pytest.raises(ValueError, match=rf"^{flag}: "):
        parse_and_validate(BASE + extra, world_size=2, rank=0)
