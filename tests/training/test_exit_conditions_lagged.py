"""ExitConditions on two ranks: the signal seen by one rank stops both after the same step;
``lagged`` (the loop reading its steps back an iteration late) agrees one step later,
without waiting on the collective; one rank needs no collective at all."""

import signal
from types import SimpleNamespace

from megatron.training.exit_conditions import ExitConditions
from tests.multirank import run_on_ranks


def _args():
    return SimpleNamespace(exit_signal_handler=True, exit_signal="SIGUSR2", exit_duration_in_mins=None,
                           exit_interval=None, phase_transition_iterations=None)


def _stops(rank, world_size, lagged):
    conditions = ExitConditions(_args())
    conditions.lagged = lagged
    try:
        reasons = {}
        for iteration in range(1, 7):
            if rank == 1 and iteration == 3:
                signal.raise_signal(signal.SIGUSR2)  # reaches this rank only
            reasons[iteration] = conditions.reason(iteration)
        return {i: r for i, r in reasons.items() if r is not None}
    finally:
        conditions.release()


def test_one_ranks_signal_stops_both_at_the_same_step():
    assert run_on_ranks(_stops, 2, args=(False,)) == [{i: "received SIGUSR2" for i in range(3, 7)}] * 2


def test_lagged_agreement_stops_both_one_step_later():
    assert run_on_ranks(_stops, 2, args=(True,)) == [{i: "received SIGUSR2" for i in range(4, 7)}] * 2


def test_one_rank_decides_alone(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: (_ for _ in ()).throw(AssertionError("collective")))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1)
    conditions = ExitConditions(_args())
    try:
        assert conditions.reason(1) is None
        signal.raise_signal(signal.SIGUSR2)
        assert conditions.reason(2) == "received SIGUSR2"
    finally:
        conditions.release()
