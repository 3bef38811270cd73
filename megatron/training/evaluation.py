"""Validation and test passes, and Megatron's validation block."""

from __future__ import annotations

import math
import time
from typing import Dict, Optional

import torch

from megatron.core.pipeline_parallel.schedules import get_forward_backward_func
from megatron.core.process_groups import ProcessGroups
from megatron.training.eval_batches import eval_batches, evaluation_micro_batch_size
from megatron.training.global_vars import get_args
from megatron.training.housekeeping import empty_unused_memory
from megatron.training.loss_reduction import reduce_reported_losses
from megatron.training.rank_print import print_rank_last
from megatron.training.run_state import RunState
from megatron.training.training_log import format_duration
from megatron.training.validation_sets import ValidationSets


def progress_every(eval_iters: int) -> int:
    """Evaluation batches between progress lines: about ten lines per evaluation."""
    return max(1, eval_iters // 10)


def progress_line(label: str, done: int, eval_iters: int, elapsed_s: float) -> str:
    """`` evaluating validation: 20/100 batches | elapsed: 12.3 s | ETA: 0:00:48 |``"""
    eta = elapsed_s / done * (eval_iters - done) if done else 0.0
    return (f" evaluating {label}: {done}/{eval_iters} batches | elapsed: {elapsed_s:.1f} s |"
            f" ETA: {format_duration(eta)} |")


def evaluate(forward_step_func, data_iterator, model, pg: ProcessGroups, eval_iters: int,
             label: str = "validation", run_state: Optional[RunState] = None) -> Dict[str, float]:
    """Average each reported loss over ``eval_iters`` global batches, without gradients.

    Prints a progress line (``progress_line``) every ``progress_every(eval_iters)`` batches
    and after the last one, so a long evaluation is not silent. The samples read are added
    to ``run_state.consumed_valid_samples`` when a run state is given."""
    args = get_args()
    start = time.time()
    every = progress_every(eval_iters)
    for chunk in model:
        chunk.eval()
    sums: Dict[str, torch.Tensor] = {}
    batches = eval_batches(args, args.data_parallel_size)
    forward_backward = get_forward_backward_func(pg, vp_size=len(model))
    with torch.no_grad(), evaluation_micro_batch_size(args, batches.micro_batch_size):
        for step in range(1, eval_iters + 1):
            reported = forward_backward(
                forward_step_func=forward_step_func,
                data_iterator=data_iterator,
                model=model,
                num_microbatches=batches.num_microbatches,
                seq_length=args.seq_length,
                micro_batch_size=batches.micro_batch_size,
                forward_only=True,
                pg_collection=pg,
            )
            empty_unused_memory(args, level=1)
            if pg.is_pipeline_last_stage():
                for key, value in reduce_reported_losses(reported, pg, keep_sum_and_count=True).items():
                    sums[key] = sums.get(key, torch.zeros_like(value)) + value
            if run_state is not None:
                run_state.consumed_valid_samples += batches.global_batch_size
            if step % every == 0 or step == eval_iters:
                print_rank_last(progress_line(label, step, eval_iters, time.time() - start))
    for chunk in model:
        chunk.train()
    return {key: float(v[0] / v[1]) for key, v in sums.items()}


def evaluate_and_print_results(prefix: str, forward_step_func, data_iterator, model, pg, iteration: int,
                               writers=None, eval_iters: int = None, label: str = "validation",
                               run_state: Optional[RunState] = None) -> Dict[str, float]:
    """Run ``evaluate`` and print the dashed block Megatron prints; for ``ValidationSets``
    (--full-validation, --multiple-validation-sets), one block per set, keyed by its label.
    The scalars written go at ``run_state``'s consumed training samples (without a run
    state, at those on ``args``)."""
    if isinstance(data_iterator, ValidationSets):
        return {s.label: evaluate_and_print_results(prefix, forward_step_func, s.iterator, model, pg, iteration,
                                                    writers, s.eval_iters, s.label, run_state)
                for s in data_iterator if s.eval_iters > 0}
    args = get_args()
    state = run_state if run_state is not None else RunState.from_args(args)
    results = evaluate(forward_step_func, data_iterator, model, pg, eval_iters or args.eval_iters, label, state)
    line = f" {label} loss at {prefix} | "
    for key, value in results.items():
        ppl = math.exp(min(20.0, value))
        line += f"{key} value: {value:.6E} | {key} PPL: {ppl:.6E} | "
        if writers is not None and writers.active:
            scalars = {f"{key} {label}": value}
            if args.log_validation_ppl_to_tensorboard:
                scalars[f"{key} {label} ppl"] = ppl
            writers.write(scalars, iteration, state.consumed_train_samples)
    dashes = "-" * (len(line) + 1)
    print_rank_last(dashes)
    print_rank_last(line)
    print_rank_last(dashes)
    return results
