"""--iterations-to-skip: a listed iteration reads and drops its global batch (no forward, no
update, no log line), every layout drops the same data, and the data after it is unchanged."""

from __future__ import annotations

import re

import pytest

from tests.training.gpt_runs import losses, run_gpt

ITERATION = re.compile(r"iteration +(\d+)/ +\d+ \| consumed samples: +(\d+) \|")
SKIP = ["--iterations-to-skip", "2", "3", "--num-layers", "4"]


def _iterations(log: str):
    return [(int(i), int(c)) for i, c in ITERATION.findall(log)]


@pytest.fixture(scope="module")
def skipped_one_process():
    return run_gpt(1, SKIP, iters=5)


def test_skipped_iterations_read_their_batches_and_log_nothing(skipped_one_process):
    log = skipped_one_process
    # global batch 8: iterations 2 and 3 are gone from the log but their samples are consumed
    assert _iterations(log) == [(1, 8), (4, 32), (5, 40)]
    assert "skipped iteration 2 (--iterations-to-skip): its 8 samples were read and dropped" in log
    assert "skipped iteration 3" in log


def test_the_data_after_the_skip_is_the_data_of_a_run_without_it(skipped_one_process):
    """Iteration 4 of the skipping run sees batch 4: against a run without the skip that
    does not train (--lr 0, so weights stay put in both), its loss is that run's iteration 4
    loss, and iteration 1 agrees too. A skip that read no data (or too much) would show the
    loss of another batch."""
    frozen = ["--lr", "0", "--min-lr", "0"]
    plain = losses(run_gpt(1, ["--num-layers", "4"] + frozen, iters=5))
    skipping = losses(run_gpt(1, SKIP + frozen, iters=5))
    assert skipping == [plain[0], plain[3], plain[4]]
    assert len(set(plain)) == 5  # the batches really differ


@pytest.mark.parametrize("world, extra", [
    (2, ["--pipeline-model-parallel-size", "2"]),
    (2, ["--tensor-model-parallel-size", "2"]),
    (2, ["--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "2"]),
], ids=["pp2", "tp2", "pp2-vpp2"])
def test_every_layout_skips_the_same_data(skipped_one_process, world, extra):
    got, ref = losses(run_gpt(world, SKIP + extra, iters=5)), losses(skipped_one_process)
    assert len(got) == len(ref) == 3
    for x, y in zip(got, ref):
        assert abs(x - y) <= 2e-5 * abs(y), (got, ref)
