"""Preemption as launchers deliver it: SIGTERM to torchrun's whole process group (what
slurm's ``--signal``, Kubernetes and torchrun itself do) reaches the DataLoader workers
too. They must ignore it, so the ranks' --exit-signal-handler path still agrees on a
step, saves a checkpoint there and exits."""

from __future__ import annotations

import os
import re
import signal
import subprocess

from megatron.training.checkpointing import directory as layout
from tests.training.checkpointing import crash_harness as harness

LONG_RUN = 2000
NO_PERIODIC_SAVE = 10 * LONG_RUN
EXITING = re.compile(r"exiting program at iteration (\d+)")


def test_sigterm_to_the_launchers_group_saves_with_dataloader_workers(tmp_path):
    root = str(tmp_path / "ckpt")
    flags = harness.train_flags(LONG_RUN, save=root, save_interval=NO_PERIODIC_SAVE)
    flags += ["--exit-signal-handler", "--num-workers", "2"]
    launch = harness.Launch(flags)
    try:
        seen = []
        harness.wait_for_line(launch.process, re.compile(r"^LOSS 3 "), seen, timeout=240)
        # start_new_session: the launcher leads its own group, holding the ranks and their workers.
        os.killpg(launch.process.pid, signal.SIGTERM)
        done = launch.finish()
    finally:
        launch.kill()
    output = "".join(seen) + done.output
    assert "DataLoader worker" not in output, output[-4000:]
    stopped = [int(i) for i in EXITING.findall(output)]
    assert len(stopped) == 1, output[-4000:]
    assert layout.committed_iterations(root) == stopped
    assert layout.read_tracker(root) == (stopped[0], False)


def test_torchrun_max_restarts_resumes_from_the_last_checkpoint(tmp_path):
    """A rank killed mid-run: torchrun (--max-restarts 1) starts every rank again, the
    process group forms again (env:// through the launcher's store) and the run resumes
    from the last committed checkpoint to the end, logging the restart."""
    root = str(tmp_path / "ckpt")
    flags = harness.train_flags(12, save=root, load=root, save_interval=2)
    cmd = harness.command(flags)
    cmd.insert(cmd.index("--standalone") + 1, "--max-restarts=1")
    process = subprocess.Popen(cmd, cwd=harness.REPO_ROOT, env=harness.environment(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        seen, pids = [], {}
        while len(pids) < 2:
            match = harness.wait_for_line(process, harness.PID_LINE, seen, timeout=240)
            pids[int(match.group(1))] = int(match.group(2))
        harness.wait_for_line(process, re.compile(r"^LOSS 3 "), seen, timeout=240)
        os.kill(pids[1], signal.SIGKILL)
        output, _ = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    output = "".join(seen) + output
    assert process.returncode == 0, output[-4000:]
    assert "restart 1 of at most 1" in output, output[-4000:]
    resumed = re.findall(r"successfully loaded checkpoint from \S+ at iteration (\d+)", output)
    assert resumed and int(resumed[-1]) >= 2, output[-4000:]
    assert layout.read_tracker(root) == (12, False)
