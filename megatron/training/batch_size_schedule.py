"""Command-line rules of --step-batch-size-schedule (the schedule itself is
``megatron.core.num_microbatches_calculator.StepBatchsizeNumMicroBatchesCalculator``)."""

from __future__ import annotations

import argparse
from typing import Optional

from megatron.core.num_microbatches_calculator import parse_step_batch_size_schedule


def scheduled_global_batch_size(args: argparse.Namespace) -> Optional[int]:
    """The largest batch of --step-batch-size-schedule (what --global-batch-size must be), or None."""
    if args.step_batch_size_schedule is None:
        return None
    return max(batch for _, batch in parse_step_batch_size_schedule(args.step_batch_size_schedule, args.seq_length))


def check_step_batch_size_schedule(args: argparse.Namespace) -> None:
    """ValueError, naming the flag and the fix, for combinations Megatron-LM refuses."""
    if args.step_batch_size_schedule is None:
        return
    for flag, given in (("--rampup-batch-size", args.rampup_batch_size is not None),
                        ("--decrease-batch-size-if-needed", args.decrease_batch_size_if_needed),
                        ("--train-iters", args.train_iters is not None)):
        if given:
            hint = "train with --train-samples" if flag == "--train-iters" else f"drop {flag}"
            raise ValueError(f"--step-batch-size-schedule cannot be combined with {flag}: the schedule sets the "
                             f"batch size by consumed samples; {hint}")
    largest = scheduled_global_batch_size(args)
    if args.global_batch_size is not None and args.global_batch_size != largest:
        raise ValueError(f"--global-batch-size {args.global_batch_size} differs from the largest batch of "
                         f"--step-batch-size-schedule ({largest}); drop --global-batch-size or set it to {largest}")
