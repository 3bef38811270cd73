"""Timers report over the group they are given, not over an implicit world."""

import torch.distributed as dist

from megatron.core.timers import Timers
from tests.multirank import run_on_ranks


def _report(timers: Timers, seconds: float) -> str:
    timer = timers("step")
    timer.start(barrier=True)
    timer.stop(barrier=True)
    timer._elapsed = seconds  # a known duration per rank, instead of a sleep
    return timers.log_string(["step"])


def _reports(rank, world_size):
    # Every rank takes part in making both singleton groups, then reports over its own.
    singletons = [dist.new_group([r], backend="gloo") for r in range(world_size)]
    own = _report(Timers(group=singletons[rank]), rank + 1.0)
    world = _report(Timers(group=dist.group.WORLD), rank + 1.0)
    default = _report(Timers(), rank + 1.0)
    return own, world, default


def test_report_spans_the_given_group_only():
    (own0, world0, default0), (own1, _, _) = run_on_ranks(_reports, world_size=2)
    assert "step: (1000.00, 1000.00)" in own0
    assert "step: (2000.00, 2000.00)" in own1
    assert "step: (1000.00, 2000.00)" in world0
    assert default0 == world0  # None is documented as the world group


def test_single_process_without_distributed():
    timers = Timers(log_option="max")
    assert "step: 500.00" in _report(timers, 0.5)
