"""--start-eval-at-iter: periodic evaluation only from that iteration on, and the validation
split sized for the evaluations that remain (as Megatron-LM does)."""

from megatron.training.arguments import parse_and_validate
from megatron.training.data_iterators import train_valid_test_num_samples
from tests.training.gpt_runs import run_gpt

BASE = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
        "--max-position-embeddings 32 --micro-batch-size 2 --global-batch-size 8 --train-iters 10 "
        "--eval-interval 2 --eval-iters 3").split()


def test_validation_samples_drop_the_skipped_evaluations():
    def valid_samples(*extra):
        return train_valid_test_num_samples(parse_and_validate(BASE + list(extra), world_size=1, rank=0))[1]

    assert valid_samples() == 6 * 3 * 8  # iterations 2, 4, ..., 10 and the one after training
    assert valid_samples("--start-eval-at-iter", "5") == 4 * 3 * 8  # 2 and 4 skipped
    assert valid_samples("--start-eval-at-iter", "50") == 1 * 3 * 8  # only the one after training


def test_evaluation_starts_at_the_given_iteration():
    log = run_gpt(1, ["--eval-interval", "2", "--eval-iters", "1", "--start-eval-at-iter", "3"], iters=6)
    periodic = [it for it in range(1, 7) if f" validation loss at iteration {it} |" in log]
    assert periodic == [4, 6], log[-3000:]
    assert "validation loss at iteration 6 on validation set" in log  # the evaluation after training
