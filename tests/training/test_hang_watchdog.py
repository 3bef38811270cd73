"""--hang-watchdog-seconds: a rank that enters no phase for N seconds is reported once, with
its rank, iteration, phase and every thread's stack; --hang-watchdog-exit then ends it with
status 124. Hangs are injected sleeps."""

import subprocess
import sys
import textwrap
import time

import pytest

from megatron.training.hang_watchdog import HANG_EXIT_CODE, HangWatchdog
from tests.multirank import RankFailure
from tests.training.gpt_runs import run_gpt


def _stuck_in_a_collective(seconds):
    time.sleep(seconds)


def test_a_stall_is_reported_once_with_rank_iteration_phase_and_stacks(tmp_path):
    with open(tmp_path / "report.txt", "w+") as stream:
        watchdog = HangWatchdog(0.3, rank=3, stream=stream, poll_seconds=0.05).start()
        watchdog.set_phase("forward-backward", 7)
        _stuck_in_a_collective(1.0)
        watchdog.stop()
        stream.seek(0)
        report = stream.read()
    assert report.count("no progress") == 1, report
    assert "rank 3: no progress for" in report and "at iteration 7, phase forward-backward" in report
    assert "_stuck_in_a_collective" in report  # the main thread's stack names where it waits


def test_progress_keeps_it_quiet(tmp_path):
    with open(tmp_path / "report.txt", "w+") as stream:
        watchdog = HangWatchdog(0.4, rank=0, stream=stream, poll_seconds=0.05).start()
        for iteration in range(10):
            watchdog.set_phase("forward-backward", iteration)
            time.sleep(0.1)
        watchdog.stop()
        stream.seek(0)
        assert stream.read() == ""


def test_exit_on_hang_ends_the_process_with_124():
    script = textwrap.dedent("""
        import time
        from megatron.training.hang_watchdog import HangWatchdog
        HangWatchdog(0.3, rank=0, exit_on_hang=True, poll_seconds=0.05).start().set_phase("optimizer", 2)
        time.sleep(30)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == HANG_EXIT_CODE
    assert "at iteration 2, phase optimizer" in done.stderr


def test_a_hung_training_run_exits_124():
    with pytest.raises(RankFailure) as failure:
        run_gpt(1, ["--hang-watchdog-seconds", "2", "--hang-watchdog-exit"], iters=3, setup="sleep_in_iteration_2")
    assert f"exit codes [{HANG_EXIT_CODE}]" in str(failure.value)
