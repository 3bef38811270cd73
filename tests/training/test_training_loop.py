"""The training loop's user-visible behaviour: log line, batch ramp-up, sample-based
length, evaluation, TensorBoard scalars, and stopping on NaN."""

import re

import pytest

from tests.multirank import RankFailure
from tests.training.gpt_runs import losses, run_gpt

LOG_LINE = re.compile(
    r"^ \[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}\] iteration +(\d+)/ +(\d+) \|"
    r" consumed samples: +(\d+) \|"
    r" elapsed time per iteration \(ms\): [0-9.]+ \|"
    r"( throughput per GPU \(TFLOP/s/GPU\): [0-9.]+ \|)?"
    r" learning rate: [0-9.]+E[+-]\d\d \|"
    r" global batch size: +(\d+) \|"
    r" lm loss: [0-9.]+E[+-]\d\d \|"
    r" loss scale: [0-9.]+ \|"
    r" grad norm: [0-9.]+ \|"
    r" number of skipped iterations: +\d+ \|"
    r" number of nan iterations: +\d+ \|"
    # beyond Megatron's fields, appended at the end
    r" tokens per second: \d+ \|"
    r" tokens per second per GPU: \d+ \|"
    r" ETA: \d+:\d\d:\d\d \|$"
)


def _log_lines(log):
    return [line for line in log.splitlines() if " iteration " in line and "consumed samples" in line]


def test_log_line_has_megatrons_fields_in_order():
    log = run_gpt(1, ["--log-throughput", "--log-interval", "2", "--eval-iters", "1", "--eval-interval", "2"],
                  iters=4)
    lines = _log_lines(log)
    # printed for the first iteration and then every --log-interval iterations
    assert [int(LOG_LINE.match(line).group(1)) for line in lines] == [1, 2, 4], lines
    assert all("throughput per GPU (TFLOP/s/GPU)" in line for line in lines)
    assert log.count(" validation loss at iteration 2 |") == 1
    assert "validation loss at iteration 4 on validation set | lm loss value:" in log
    assert "lm loss PPL:" in log


def test_rampup_batch_size_grows_global_batch():
    """--rampup-batch-size 4 4 16: batch 4 for the first 16 samples, then 8 (Megatron
    allows ramp-up only with sample-based training)."""
    log = run_gpt(1, ["--rampup-batch-size", "4", "4", "16", "--train-samples", "32"], iters=None)
    batches = [int(LOG_LINE.match(line).group(5)) for line in _log_lines(log)]
    consumed = [int(LOG_LINE.match(line).group(3)) for line in _log_lines(log)]
    assert batches == [4, 4, 4, 4, 8, 8], batches
    assert consumed == [4, 8, 12, 16, 24, 32], consumed
    assert {int(LOG_LINE.match(line).group(2)) for line in _log_lines(log)} == {6}  # the derived total


def test_train_samples_sets_the_length():
    log = run_gpt(1, ["--train-samples", "24"], iters=None)
    lines = _log_lines(log)
    assert int(LOG_LINE.match(lines[-1]).group(3)) == 24 and len(lines) == 3
    assert [int(LOG_LINE.match(line).group(2)) for line in lines] == [3, 3, 3]  # not "/ 0"


def test_nan_loss_stops_before_the_step_naming_rank_and_iteration():
    with pytest.raises(RankFailure) as failure:
        # the planted NaN happens once: a rerun of the iteration would call it a transient
        # fault (tests/training/test_result_validation.py); without rerun it stops at once
        run_gpt(2, ["--rerun-mode", "disabled"], iters=5, setup="nan_loss")
    message = str(failure.value)
    # each rank runs 2 micro-batches per iteration: the 3rd loss call is iteration 2
    assert "iteration 2: NaN/Inf in the loss on rank(s) [1]" in message, message
    assert "optimizer step was not taken" in message


def test_tensorboard_receives_the_logged_scalars(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    log = run_gpt(1, ["--tensorboard-dir", str(tmp_path)], iters=3)
    acc = event_accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"lm loss", "learning-rate", "batch-size", "grad-norm", "loss-scale", "lm loss vs samples"} <= tags
    logged = [float(f"{v:.6E}") for v in losses(log)]
    written = [float(f"{e.value:.6E}") for e in acc.Scalars("lm loss")]
    assert written == pytest.approx(logged, rel=1e-6)


def test_no_log_loss_scale_to_tensorboard_leaves_it_out(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run_gpt(1, ["--tensorboard-dir", str(tmp_path), "--no-log-loss-scale-to-tensorboard"], iters=3)
    acc = event_accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert "lm loss" in tags and "loss-scale" not in tags
