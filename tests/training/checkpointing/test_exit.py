"""Clean exits (DESIGN.md section 6) on real 2-rank runs: SIGTERM to one rank with
--exit-signal-handler, --exit-interval, --exit-duration-in-mins all stop every rank after
the same iteration, save exactly one checkpoint there and exit with status 0;
--keep-last-checkpoints keeps the newest; --async-save writes what a synchronous save does.

--exit-duration-in-mins takes whole minutes and 0 means "no limit" (as in Megatron), so
the duration test backdates the run's start by 1.5 minutes and asks for 1.
"""

from __future__ import annotations

import os
import re
import signal

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from megatron.training.checkpointing import directory as layout
from tests.training.checkpointing import crash_harness as harness

LONG_RUN = 2000  # iterations: far more than a test waits for, so only an exit condition ends it
NO_PERIODIC_SAVE = 10 * LONG_RUN  # --save needs a --save-interval; this one never comes
EXITING = re.compile(r"exiting program at iteration (\d+): (.*)$", re.MULTILINE)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every run of this file, launched side by side: {name: (checkpoint root, Finished)}."""
    roots = {name: str(tmp_path_factory.mktemp(name))
             for name in ("sigterm", "interval", "duration", "sync", "async")}
    signalled = harness.Launch(harness.train_flags(LONG_RUN, save=roots["sigterm"], save_interval=NO_PERIODIC_SAVE)
                               + ["--exit-signal-handler"])
    others = {
        "interval": harness.Launch(harness.train_flags(LONG_RUN, save=roots["interval"], save_interval=1)
                                   + ["--exit-interval", "4", "--keep-last-checkpoints", "2"]),
        "duration": harness.Launch(harness.train_flags(LONG_RUN, save=roots["duration"],
                                                       save_interval=NO_PERIODIC_SAVE)
                                   + ["--exit-duration-in-mins", "1"],
                                   extra_env={"PRETEND_STARTED_MINUTES_AGO": "1.5"}),
        "sync": harness.Launch(harness.train_flags(4, save=roots["sync"], save_interval=2)),
        "async": harness.Launch(harness.train_flags(4, save=roots["async"], save_interval=2) + ["--async-save"]),
    }
    try:
        seen = []
        pids = {}
        # Signal rank 1 alone once a few iterations have run (a scheduler's SIGTERM may reach one node).
        while len(pids) < 2:
            match = harness.wait_for_line(signalled.process, harness.PID_LINE, seen, timeout=240)
            pids[int(match.group(1))] = int(match.group(2))
        harness.wait_for_line(signalled.process, re.compile(r"^LOSS 3 "), seen, timeout=240)
        os.kill(pids[1], signal.SIGTERM)
        finished = signalled.finish()
        whole_log = harness.Finished(finished.returncode, "".join(seen) + finished.output)
        results = {"sigterm": (roots["sigterm"], whole_log)}
        results.update({name: (roots[name], launch.finish()) for name, launch in others.items()})
    finally:
        for launch in [signalled, *others.values()]:
            launch.kill()
    return results


def _stopped_at(done: harness.Finished) -> int:
    assert done.returncode == 0, done.output[-4000:]
    exits = EXITING.findall(done.output)
    assert len(exits) == 1, f"expected one 'exiting program' line:\n{done.output[-4000:]}"
    iteration = int(exits[0][0])
    assert max(done.losses()) == iteration, "the last rank trained past the agreed exit iteration"
    return iteration


def test_sigterm_to_one_rank_stops_all_at_one_iteration_with_one_checkpoint(runs):
    root, done = runs["sigterm"]
    iteration = _stopped_at(done)
    assert iteration >= 3 and "received SIGTERM" in done.output
    assert layout.committed_iterations(root) == [iteration]
    assert layout.read_tracker(root) == (iteration, False)
    assert done.output.count("saving checkpoint at iteration") == 1


def test_exit_interval_saves_and_stops_and_keeps_the_last_two(runs):
    root, done = runs["interval"]
    assert _stopped_at(done) == 4
    assert "--exit-interval 4" in done.output
    assert layout.committed_iterations(root) == [3, 4]
    assert layout.read_tracker(root) == (4, False)


def test_exit_duration_saves_and_stops(runs):
    root, done = runs["duration"]
    assert _stopped_at(done) == 1
    assert "--exit-duration-in-mins 1 reached" in done.output
    assert layout.committed_iterations(root) == [1]


def _tensors(root: str, iteration: int, out_file: str) -> dict:
    dcp_to_torch_save(layout.iteration_dir(root, iteration), out_file)
    return {k: v for k, v in torch.load(out_file, weights_only=False).items() if isinstance(v, torch.Tensor)}


def test_async_save_commits_the_same_tensors_as_a_synchronous_save(runs, tmp_path):
    (sync_root, sync_run), (async_root, async_run) = runs["sync"], runs["async"]
    for done in (sync_run, async_run):
        assert done.returncode == 0, done.output[-4000:]
    assert "in the background" in async_run.output
    assert async_run.losses() == sync_run.losses()
    for iteration in (2, 4):
        expected = _tensors(sync_root, iteration, str(tmp_path / f"sync{iteration}.pt"))
        actual = _tensors(async_root, iteration, str(tmp_path / f"async{iteration}.pt"))
        assert sorted(expected) == sorted(actual) and len(expected) > 10
        for key in expected:
            assert torch.equal(expected[key], actual[key]), f"iteration {iteration}: {key} differs"
    assert layout.partial_checkpoints(async_root) == []
