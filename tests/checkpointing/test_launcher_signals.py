"""Preemption as launchers deliver it: SIGTERM to torchrun's whole process group (what
slurm's ``--signal``, Kubernetes and torchrun itself do) reaches the DataLoader workers
too. They must ignore it, so the ranks' --exit-signal-handler path still agrees on a
step, saves a checkpoint there and exits."""

from __future__ import annotations

import os
import re
import signal

from megatron.training.checkpointing import directory as layout
from tests.checkpointing import crash_harness as harness

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
