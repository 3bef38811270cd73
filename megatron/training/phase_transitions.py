"""Training phases (--phase-transition-iterations "t1,t2,..."), as in Megatron-LM.

At each transition iteration the run saves a checkpoint (with --save) and exits, so the next
phase can be launched with other data (a new --data-path blend) from that checkpoint. Each
phase's training dataset is built for that phase alone and read from its first sample:

- samples of the phase = (end - start) x global batch size, where start is the last
  transition at or before the checkpoint's iteration (0 for the first phase) and end the next
  transition, or the end of training (--train-iters, or --train-samples / global batch);
- the sampler starts at (checkpoint iteration - start) x global batch size, so resuming in
  the middle of a phase continues it where it stopped.

The global batch size must be fixed: a ramp-up or step schedule would make iterations and
samples disagree.
"""

from __future__ import annotations

import argparse
from typing import List, Tuple


def phase_transitions(args: argparse.Namespace) -> List[int]:
    """The transition iterations, sorted (Megatron accepts "8, 2, 5"); [] without the flag."""
    value = args.phase_transition_iterations
    if value is None:
        return []
    items = value.replace(",", " ").split() if isinstance(value, str) else list(value)
    try:
        iterations = sorted({int(item) for item in items})
    except ValueError:
        raise ValueError(f"--phase-transition-iterations {value!r}: give iteration numbers separated by commas, "
                         "e.g. \"1000,5000\"") from None
    if not iterations or iterations[0] < 1:
        raise ValueError(f"--phase-transition-iterations {value!r}: iterations must be positive")
    return iterations


def check_phase_transitions(args: argparse.Namespace) -> None:
    """ValueError, naming the flag and the fix, where phases cannot be counted in samples."""
    if not phase_transitions(args):
        return
    for flag, given in (("--rampup-batch-size", args.rampup_batch_size is not None),
                        ("--step-batch-size-schedule", args.step_batch_size_schedule is not None),
                        ("--decrease-batch-size-if-needed", args.decrease_batch_size_if_needed)):
        if given:
            raise ValueError(f"--phase-transition-iterations needs a fixed global batch size; drop {flag}")


def _total_iterations(args: argparse.Namespace) -> int:
    if args.train_iters:
        return args.train_iters
    return -(-(args.train_samples or 0) // args.global_batch_size)


def current_phase(args: argparse.Namespace, iteration: int) -> Tuple[int, int]:
    """(first, end) iterations of the phase that continues after ``iteration``."""
    bounds = [0] + phase_transitions(args) + [_total_iterations(args)]
    start = max(b for b in bounds if b <= iteration)
    later = [b for b in bounds if b > iteration]
    return start, (min(later) if later else start)


def phase_train_samples(args: argparse.Namespace, total_samples: int) -> int:
    """Training samples of the current phase (``total_samples`` without phases)."""
    if not phase_transitions(args):
        return total_samples
    start, end = current_phase(args, getattr(args, "iteration", 0) or 0)
    end_samples = min(end * args.global_batch_size, total_samples)
    return max(0, end_samples - start * args.global_batch_size)


def phase_consumed_samples(args: argparse.Namespace, consumed_train_samples: int) -> int:
    """Where the training sampler starts: within the current phase's dataset."""
    if not phase_transitions(args):
        return consumed_train_samples
    iteration = getattr(args, "iteration", 0) or 0
    return (iteration - current_phase(args, iteration)[0]) * args.global_batch_size


def is_phase_transition(args: argparse.Namespace, iteration: int) -> bool:
    return iteration in phase_transitions(args)
