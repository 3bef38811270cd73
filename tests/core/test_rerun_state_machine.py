"""The rerun state machine on a fake step: a rejected result is re-run on the same data and
random state; a result that does not reproduce stops the run (exit code 17), one that does
is fatal (NaN) or skipped and counted (a spike); report_stats measures run-to-run gaps."""

import math

import pytest
import torch

from megatron.core.rerun_state_machine import (
    Check,
    RerunDataIterator,
    RerunErrorInjector,
    RerunStateMachine,
    ResultRejected,
    SpikeWindow,
    Verdict,
)


class FakeStep:
    """Reads one micro-batch (a number) per run and draws one random number; ``loss`` maps
    (call index, batch) to the reported loss, so a test can make one run differ."""

    def __init__(self, iterator, loss=None):
        self.iterator, self.calls, self.seen = iterator, 0, []
        self.loss = loss or (lambda call, batch: float(batch))

    def __call__(self):
        batch = next(self.iterator)
        self.seen.append((batch, torch.rand(1).item()))
        self.calls += 1
        return {"loss": self.loss(self.calls, batch)}


def _machine(mode="validate_results", fatal=True, spike=None, **kw):
    records = []
    machine = RerunStateMachine(mode=mode, checks={"loss": Check(fatal=fatal, spike_factor=spike)},
                                on_rejection=lambda *r: records.append(r), **kw)
    return machine, records


def test_spike_window():
    window = SpikeWindow(10.0, size=3)
    assert not window.is_spike(1e9)  # no history
    for value in (2.0, 3.0, math.nan, 1.0):
        window.accept(value)
    assert list(window.values) == [2.0, 3.0, 1.0]
    assert not window.is_spike(30.0) and window.is_spike(30.1)


def test_good_step_runs_once():
    machine, records = _machine()
    iterator = RerunDataIterator(iter(range(10)))
    step = FakeStep(iterator)
    assert machine.run_step(1, step, [iterator]) is Verdict.ACCEPT
    assert step.calls == 1 and records == []


def test_rerun_replays_data_and_random_state_and_a_transient_fault_stops():
    machine, records = _machine()
    iterator = RerunDataIterator(iter(range(10)))
    step = FakeStep(iterator, loss=lambda call, batch: math.nan if call == 1 else float(batch))
    assert machine.run_step(1, step, [iterator]) is Verdict.STOP
    assert step.calls == 2 and step.seen[0] == step.seen[1]  # same micro-batch, same random draw
    assert records == [(1, "loss", "first_rerun_not_reproducible", records[0][3], 0.0)]
    assert next(iterator) == 1  # the replayed batch is not read twice from the source


def test_reproduced_nan_is_fatal():
    machine, records = _machine()
    iterator = RerunDataIterator(iter(range(10)))
    with pytest.raises(ResultRejected, match="reproduced"):
        machine.run_step(3, FakeStep(iterator, loss=lambda call, batch: math.nan), [iterator])
    assert records[0][:3] == (3, "loss", "first_rerun_reproducible")


def test_disabled_mode_does_not_rerun():
    machine, _ = _machine(mode="disabled")
    iterator = RerunDataIterator(iter(range(10)))
    step = FakeStep(iterator, loss=lambda call, batch: math.nan if call == 1 else 1.0)
    with pytest.raises(ResultRejected):
        machine.run_step(1, step, [iterator])
    assert step.calls == 1


def test_reproduced_spike_is_skipped_counted_and_capped():
    machine, records = _machine(fatal=False, spike=10.0, max_consecutive_skips=3)
    iterator = RerunDataIterator(iter([1, 2, 500, 1, 600, 700, 800]))
    step = FakeStep(iterator)
    verdicts = [machine.run_step(i, step, [iterator]) for i in range(1, 6)]
    assert verdicts == [Verdict.ACCEPT, Verdict.ACCEPT, Verdict.SKIP, Verdict.ACCEPT, Verdict.SKIP]
    assert machine.rejected_total == 2 and step.calls == 7  # each spike was run twice
    assert list(machine.windows["loss"].values) == [1, 2, 1]  # spikes never enter the window
    machine.run_step(6, step, [iterator])
    with pytest.raises(ResultRejected, match="diverged"):
        machine.run_step(7, step, [iterator])


def test_injected_errors():
    for kind, outcome in (("transient_error", Verdict.STOP), ("persistent_error", ResultRejected)):
        machine, _ = _machine(injector=RerunErrorInjector(rate=1, kind=kind))
        iterator = RerunDataIterator(iter(range(10)))
        if outcome is Verdict.STOP:
            assert machine.run_step(1, FakeStep(iterator), [iterator]) is Verdict.STOP
        else:
            with pytest.raises(ResultRejected):
                machine.run_step(1, FakeStep(iterator), [iterator])
    with pytest.raises(ValueError, match="--error-injection-type"):
        RerunErrorInjector(1, "bit_flip")
    with pytest.raises(ValueError, match="--error-injection-rate -1"):
        RerunErrorInjector(-1)


def test_report_stats_reruns_every_step_and_keeps_the_first_result():
    machine, _ = _machine(mode="report_stats")
    iterator = RerunDataIterator(iter(range(10)))
    step = FakeStep(iterator, loss=lambda call, batch: batch + (0.25 if call % 2 == 0 else 0.0))
    assert machine.run_step(1, step, [iterator]) is Verdict.ACCEPT
    assert step.calls == 2 and machine.largest_rerun_difference == {"loss": 0.25}


def test_a_nan_under_a_spike_check_alone_passes_to_the_loss_scaler():
    """fp16 dynamic scaling turns the NaN check off; an overflow must still reach the
    optimizer, whose scaler halves the scale, rather than be skipped as a spike."""
    machine, _ = _machine(fatal=False, spike=10.0)
    iterator = RerunDataIterator(iter(range(10)))
    step = FakeStep(iterator, loss=lambda call, batch: math.inf if call == 2 else 1.0)
    assert [machine.run_step(i, step, [iterator]) for i in (1, 2, 3)] == [Verdict.ACCEPT] * 3
    assert step.calls == 3 and machine.rejected_total == 0
