"""Evaluation's own batch sizes: ``--eval-micro-batch-size`` and ``--eval-global-batch-size``.

As in Megatron-LM, each defaults to its training counterpart; validation and test passes read
``eval_iters`` global batches of the evaluation size, each split into micro-batches of the
evaluation size (a larger micro-batch is possible without gradients and optimizer state).
"""

from __future__ import annotations

import argparse
import contextlib
from typing import NamedTuple


class EvalBatches(NamedTuple):
    micro_batch_size: int
    global_batch_size: int
    num_microbatches: int


def eval_batches(args: argparse.Namespace, data_parallel_size: int) -> EvalBatches:
    """The evaluation batch sizes, checked; raises ValueError naming the flag to fix."""
    mbs = args.eval_micro_batch_size or args.micro_batch_size
    gbs = args.eval_global_batch_size or args.global_batch_size or args.micro_batch_size * data_parallel_size
    for flag, value in (("--eval-micro-batch-size", args.eval_micro_batch_size),
                        ("--eval-global-batch-size", args.eval_global_batch_size)):
        if value is not None and value <= 0:
            raise ValueError(f"{flag} {value}: must be positive. Fix: pass a positive number or drop the flag")
    step = mbs * data_parallel_size
    if gbs % step and args.decrease_batch_size_if_needed and gbs >= step:
        gbs -= gbs % step  # as training's batch is with --decrease-batch-size-if-needed
    if gbs % step:
        raise ValueError(f"--eval-global-batch-size {gbs}: must be a multiple of the evaluation micro-batch size "
                         f"x data-parallel size = {mbs}x{data_parallel_size} = {step}. Fix: set "
                         f"--eval-global-batch-size (default --global-batch-size) to a multiple of {step}")
    return EvalBatches(mbs, gbs, gbs // step)


@contextlib.contextmanager
def evaluation_micro_batch_size(args: argparse.Namespace, micro_batch_size: int):
    """``args.micro_batch_size`` is the evaluation's inside the block, restored after it.

    Forward-step functions (``pretrain_gpt.get_batch`` and user scripts written for Megatron)
    size their batch broadcasts from ``args.micro_batch_size``; this keeps them right during
    validation and test passes without a second argument."""
    training_value = args.micro_batch_size
    args.micro_batch_size = micro_batch_size
    try:
        yield
    finally:
        args.micro_batch_size = training_value
