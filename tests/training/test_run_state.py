"""The training loop's counters (megatron/training/run_state.py): what is copied onto
``args`` for Megatron's scripts, and what a checkpoint stores and gives back."""

import argparse

from megatron.training.checkpointing.run_state import saved_counters
from megatron.training.run_state import RunState
from megatron.training.training_log import IterationStats, TrainingLogger


def _state() -> RunState:
    return RunState(iteration=7, consumed_train_samples=56, consumed_valid_samples=16, skipped_train_samples=8,
                    floating_point_operations_so_far=3.5e12, last_saved_iteration=5)


def test_publish_copies_megatron_names_onto_args():
    args = argparse.Namespace(save="dir")
    _state().publish(args)
    assert (args.iteration, args.consumed_train_samples, args.consumed_valid_samples,
            args.skipped_train_samples, args.num_floating_point_operations_so_far) == (7, 56, 16, 8, 3.5e12)
    assert not hasattr(args, "last_saved_iteration")


def test_stamped_args_leaves_the_namespace_alone():
    args = argparse.Namespace(save="dir", consumed_train_samples=0)
    stamped = _state().stamped_args(args)
    assert stamped.consumed_train_samples == 56 and stamped.save == "dir"
    assert args.consumed_train_samples == 0 and not hasattr(args, "iteration")


def test_from_args_reads_what_publish_wrote():
    args = argparse.Namespace()
    assert RunState.from_args(args) == RunState()
    _state().publish(args)
    back = RunState.from_args(args)
    assert (back.iteration, back.consumed_train_samples, back.floating_point_operations_so_far) == (7, 56, 3.5e12)


def test_checkpoint_round_trip_of_the_sample_counters():
    saved = {"iteration": 7, "args": _state().stamped_args(argparse.Namespace())}
    args = argparse.Namespace(override_ckpt_iteration=None, global_batch_size=8)
    iteration, counters = saved_counters(args, saved, finetune=False)
    state = RunState()
    state.restore_sample_counters(counters)
    assert iteration == 7
    assert (state.consumed_train_samples, state.consumed_valid_samples, state.skipped_train_samples) == (56, 16, 8)
    assert saved_counters(args, saved, finetune=True) == (0, {})
    args.override_ckpt_iteration = 3
    assert saved_counters(args, saved, finetune=False)[1]["consumed_train_samples"] == 24


def test_logger_counts_skipped_and_nan_iterations_in_the_run_state():
    import torch

    args = argparse.Namespace(train_iters=10, train_samples=None, log_interval=100, num_experts=None)
    state = RunState()
    logger = TrainingLogger(args, run_state=state)
    finite = IterationStats(losses={"lm loss": torch.tensor(1.0)}, skipped=False, grad_norm=1.0, num_zeros=None,
                            learning_rate=1e-3, loss_scale=1.0, global_batch_size=8)
    overflow = IterationStats(losses={"lm loss": torch.tensor(1.0)}, skipped=True, grad_norm=float("inf"),
                              num_zeros=None, learning_rate=1e-3, loss_scale=1.0, global_batch_size=8)
    for stats in (finite, overflow, finite, overflow):
        logger.record(2, stats, 16, 1.0, first_of_run=False)
    assert (state.skipped_iterations, state.nan_iterations) == (2, 2)
