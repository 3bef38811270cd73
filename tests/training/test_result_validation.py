"""Result checks through the rerun state machine, in real one-process runs of pretrain_gpt:
a NaN that does not reproduce when the iteration is re-run stops with exit code 17 after
saving the last completed iteration; one that reproduces is the NaN error; a reproducible
loss spike is skipped and counted in the log line; the tracker file gets a line per event."""

import pytest

from megatron.training.result_validation import TrackerFile
from tests.multirank import RankFailure
from tests.training.gpt_runs import losses, run_gpt


def test_transient_nan_reruns_then_saves_and_exits_17(tmp_path):
    tracker, save = tmp_path / "rejected.txt", tmp_path / "ckpt"
    with pytest.raises(RankFailure) as failure:
        run_gpt(1, ["--result-rejected-tracker-filename", str(tracker), "--save", str(save),
                    "--save-interval", "100"], iters=5, setup="nan_once_at_3")
    assert "SystemExit: 17" in str(failure.value)
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    lines = tracker.read_text().splitlines()
    assert any("iteration=3 rank=0" in line and "check=loss status=first_rerun_not_reproducible" in line
               for line in lines), lines


def test_reproduced_nan_is_the_nan_error():
    with pytest.raises(RankFailure) as failure:
        run_gpt(1, [], iters=5, setup="nan_always_at_3")
    message = str(failure.value)
    assert "iteration 3: NaN/Inf in the loss on rank(s) [0]" in message, message
    assert "reproduced when the iteration was re-run" in message


def test_spiky_loss_is_skipped_and_counted(tmp_path):
    tracker = tmp_path / "rejected.txt"
    log = run_gpt(1, ["--check-for-spiky-loss", "--result-rejected-tracker-filename", str(tracker)],
                  iters=5, setup="spike_at_3")
    lines = [line for line in log.splitlines() if " iteration " in line and "consumed samples" in line]
    assert len(lines) == 5
    assert "number of skipped iterations:   1" in lines[2] and "number of rejected results:   1" in lines[2]
    assert "number of rejected results:   0" in lines[1] and "number of skipped iterations:   0" in lines[3]
    assert max(losses(log)) < 100  # the spiked loss was not averaged into the line
    assert "status=first_rerun_reproducible" in tracker.read_text()


def test_unwritable_tracker_file_is_refused_naming_the_flag(tmp_path):
    with pytest.raises(ValueError, match="--result-rejected-tracker-filename .*writable"):
        TrackerFile(str(tmp_path / "no" / "such" / "dir.txt"))


def test_rerunning_every_iteration_trains_exactly_as_without():
    """report_stats runs each iteration twice; with dropout on, the losses equal a run without
    any rerun only if the rerun replays the same data and random states and leaves them as
    one run would."""
    dropout = ["--hidden-dropout", "0.1", "--attention-dropout", "0.1"]
    plain = run_gpt(1, dropout + ["--rerun-mode", "disabled", "--no-check-for-nan-in-loss-and-grad"], iters=3)
    rerun = run_gpt(1, dropout + ["--rerun-mode", "report_stats", "--check-for-spiky-loss"], iters=3)
    assert losses(rerun) == losses(plain)
