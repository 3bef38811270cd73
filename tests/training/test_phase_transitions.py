"""--phase-transition-iterations: the run stops at a transition; the next phase builds its
own training dataset and reads it from the start (resuming mid-phase continues it)."""

import argparse

import pytest

from megatron.training.data_iterators import train_valid_test_num_samples
from megatron.training.exit_conditions import ExitConditions
from megatron.training.phase_transitions import (
    check_phase_transitions,
    phase_consumed_samples,
    phase_transitions,
)
from tests.training.gpt_runs import run_gpt


def _args(**kw):
    base = dict(phase_transition_iterations="8, 2,5", train_iters=10, train_samples=None, global_batch_size=4,
                iteration=0, eval_interval=None, eval_iters=0, eval_global_batch_size=None, full_validation=False,
                rampup_batch_size=None, step_batch_size_schedule=None, decrease_batch_size_if_needed=False,
                exit_signal_handler=False, exit_duration_in_mins=None, exit_interval=None)
    base.update(kw)
    return argparse.Namespace(**base)


def test_transitions_are_parsed_and_sorted():
    assert phase_transitions(_args()) == [2, 5, 8]
    assert phase_transitions(_args(phase_transition_iterations=None)) == []
    with pytest.raises(ValueError, match="--phase-transition-iterations 'a,3'"):
        phase_transitions(_args(phase_transition_iterations="a,3"))


@pytest.mark.parametrize("iteration, samples, start", [
    (0, 2 * 4, 0), (2, 3 * 4, 0), (3, 3 * 4, 1 * 4), (5, 3 * 4, 0), (7, 3 * 4, 2 * 4), (8, 2 * 4, 0),
])
def test_each_phase_has_its_own_dataset_read_from_its_start(iteration, samples, start):
    args = _args(iteration=iteration)
    assert train_valid_test_num_samples(args)[0] == samples
    assert phase_consumed_samples(args, consumed_train_samples=iteration * 4) == start


def test_sample_based_runs_end_the_last_phase_at_train_samples():
    args = _args(train_iters=None, train_samples=38, iteration=8)
    assert train_valid_test_num_samples(args)[0] == 38 - 32


def test_the_run_stops_at_each_transition():
    conditions = ExitConditions(_args())
    assert [i for i in range(1, 11) if conditions.reason(i)] == [2, 5, 8]


def test_needs_a_fixed_global_batch():
    with pytest.raises(ValueError, match="fixed global batch size; drop --rampup-batch-size"):
        check_phase_transitions(_args(rampup_batch_size=[4, 4, 16]))


def test_two_phases_through_pretrain_gpt(tmp_path):
    save = ["--save", str(tmp_path), "--load", str(tmp_path), "--save-interval", "100",
            "--phase-transition-iterations", "2"]
    first = run_gpt(1, save, iters=4)
    assert " iteration        2/" in first and " iteration        3/" not in first
    assert "datasets target sizes (train, valid, test): (16, 0, 0)" in first
    # The second phase: 2 x 8 samples of its own, read from sample 0 (starting at the
    # consumed 16 would find the data exhausted).
    second = run_gpt(1, save, iters=4)
    assert "datasets target sizes (train, valid, test): (16, 0, 0)" in second
    assert " iteration        3/" in second and " iteration        4/" in second
