"""--step-batch-size-schedule through pretrain_gpt: the logged batch sizes and consumed samples,
and the command-line rules."""

import pytest

from megatron.training.arguments import parse_and_validate
from tests.training.gpt_runs import run_gpt
from tests.training.test_training_loop import LOG_LINE, _log_lines


def test_global_batch_steps_up_at_the_token_threshold():
    # seq 32: 512 tokens = 16 samples; batch 4 until 16 samples are consumed, then 8.
    log = run_gpt(1, ["--step-batch-size-schedule", "0:4 512:8", "--train-samples", "40"], iters=None)
    fields = [LOG_LINE.match(line).groups() for line in _log_lines(log)]
    assert [int(f[4]) for f in fields] == [4, 4, 4, 4, 8, 8, 8]
    assert [int(f[2]) for f in fields] == [4, 8, 12, 16, 24, 32, 40]
    assert {int(f[1]) for f in fields} == {7}  # the derived total of iterations


BASE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
        "--max-position-embeddings", "32", "--micro-batch-size", "2", "--mock-data"]


@pytest.mark.parametrize("extra, message", [
    (["--train-iters", "5"], "cannot be combined with --train-iters.*--train-samples"),
    (["--train-samples", "40", "--rampup-batch-size", "4", "4", "16"], "cannot be combined with --rampup-batch-size"),
    (["--train-samples", "40", "--global-batch-size", "4"], "--global-batch-size 4 differs from the largest batch"),
])
def test_command_line_rules(extra, message):
    with pytest.raises(ValueError, match=message):
        parse_and_validate(BASE + ["--step-batch-size-schedule", "0:4 512:8"] + extra)


def test_global_batch_size_defaults_to_the_largest_batch():
    args = parse_and_validate(BASE + ["--step-batch-size-schedule", "0:4 512:8", "--train-samples", "40"])
    assert args.global_batch_size == 8
