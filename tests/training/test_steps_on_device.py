"""The training loop with optimizer steps on the device (no host sync per step): the same
log lines, weights, evaluation and checkpoints as the loop that reads every step at once.

The loop steps on the device where the optimizer is fused (the GPU default) and nothing
checks a step's result before the next one (``--no-check-for-nan-in-loss-and-grad``). On
CPU the ``fused_adamw`` setup builds torch's fused AdamW, so both loops run here with the
same optimizer arithmetic: the NaN check (on by default) keeps the host loop.
"""

import re

import torch

from tests.training.gpt_runs import fused_adamw_on_cpu, run_gpt, run_gpt_with_params

ON_DEVICE = "the optimizer steps without host syncs"
# Wall-clock fields differ between runs; everything else in a line must not.
TIMING = re.compile(r"^ \[[^\]]*\]|elapsed time per iteration \(ms\): [0-9.]+|throughput per GPU \(TFLOP/s/GPU\): "
                    r"[0-9.]+|tokens per second( per GPU)?: \d+|ETA: [0-9:]+")


def _lines(log):
    keep = [line for line in log.splitlines()
            if ("iteration" in line and "consumed samples" in line) or "validation loss at" in line]
    return [TIMING.sub("", line) for line in keep]


def test_same_lines_and_weights_as_the_host_loop():
    flags = ["--log-interval", "3", "--eval-interval", "4", "--eval-iters", "1", "--log-num-zeros-in-grad",
             "--clip-grad", "0.05"]
    host_log, host_params, _ = run_gpt_with_params(1, flags, iters=7, patch=fused_adamw_on_cpu)
    device_log, device_params, _ = run_gpt_with_params(1, flags + ["--no-check-for-nan-in-loss-and-grad"], iters=7,
                                                       patch=fused_adamw_on_cpu)
    assert ON_DEVICE not in host_log and ON_DEVICE in device_log
    lines = _lines(device_log)
    assert len([l for l in lines if "consumed samples" in l]) == 3  # iterations 1, 3, 6
    assert len([l for l in lines if "validation loss" in l]) == 2  # iteration 4 and the end
    assert lines == _lines(host_log)
    for name, value in host_params[0].items():
        assert torch.equal(value, device_params[0][name]), name


def test_skipped_nan_step_is_counted_one_iteration_later():
    """A NaN loss in iteration 3 (not a log iteration): the step is skipped on the device,
    and the line of iteration 5 counts it as skipped and NaN, as the host loop does."""
    flags = ["--log-interval", "5", "--no-check-for-nan-in-loss-and-grad"]
    device_log = run_gpt(1, flags, iters=6, setup="fused_adamw+nan_once_at_3")
    host_log = run_gpt(1, flags, iters=6, setup="nan_once_at_3")
    assert ON_DEVICE in device_log and ON_DEVICE not in host_log
    for log in (device_log, host_log):
        line = [l for l in log.splitlines() if "iteration        5/" in l][0]
        assert "number of skipped iterations:   1 |" in line and "number of nan iterations:   1 |" in line, line
        assert "lm loss: nan" not in line  # the skipped step's loss is not averaged in


def test_resume_from_a_save_between_log_lines(tmp_path):
    """Stopped and saved at iteration 4 (between lines of --log-interval 3): the checkpoint
    holds the scheduler of a settled step 4, so a resumed run prints what the straight run
    prints."""
    flags = ["--log-interval", "3", "--no-check-for-nan-in-loss-and-grad", "--lr-warmup-iters", "5"]
    straight = _lines(run_gpt(1, flags, iters=9, setup="fused_adamw"))
    # --exit-interval 4: the loop stops after iteration 4 and saves it on the way out
    run_gpt(1, flags + ["--save", str(tmp_path), "--save-interval", "100", "--exit-interval", "4"], iters=9, setup="fused_adamw")
    resumed = _lines(run_gpt(1, flags + ["--load", str(tmp_path)], iters=9, setup="fused_adamw"))
    # the straight run prints iterations 1, 3, 6, 9; the resumed one 5 (its first), 6, 9.
    # Line 6 averages the loss over 4-6 in one run and over 6 alone in the other.
    assert resumed[-1] == straight[-1]
    no_loss = re.compile(r"lm loss: \S+")
    assert no_loss.sub("", resumed[1]) == no_loss.sub("", straight[2])
