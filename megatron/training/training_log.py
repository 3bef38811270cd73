"""Megatron's iteration log line, its interval bookkeeping, and the scalars for writers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Dict, Optional

import torch

from megatron.core import parallel_state
from megatron.core.num_microbatches_calculator import build_num_microbatches_calculator
from megatron.training.flops import num_floating_point_operations
from megatron.training.moe_metrics import collect_moe_metrics
from megatron.training.mtp_metrics import collect_mtp_losses
from megatron.training.rank_print import print_rank_last
from megatron.training.run_state import RunState


def total_train_iterations(args) -> int:
    """--train-iters, or the iterations --train-samples takes: the training loop adds the
    current global batch (ramp-up included) until the samples are consumed. The log line
    prints it after the slash, as Megatron prints the derived total."""
    if args.train_iters or not args.train_samples:
        return args.train_iters or 0
    schedule = args.step_batch_size_schedule
    if args.rampup_batch_size is None and not args.decrease_batch_size_if_needed and schedule is None:
        return -(-args.train_samples // args.global_batch_size)
    calculator = build_num_microbatches_calculator(
        args.rank, args.rampup_batch_size, args.global_batch_size, args.micro_batch_size,
        args.data_parallel_size, args.decrease_batch_size_if_needed, schedule, args.seq_length)
    iterations, consumed = 0, 0
    while consumed < args.train_samples:
        calculator.update(consumed, consistency_check=False)
        consumed += calculator.get_current_global_batch_size()
        iterations += 1
    return iterations


@dataclass
class IterationStats:
    """What one training iteration reports to the logger."""

    losses: Dict[str, torch.Tensor]  # key -> loss averaged over the global batch (0-d tensor)
    skipped: bool
    grad_norm: Optional[float]
    num_zeros: Optional[int]
    learning_rate: Optional[float]
    loss_scale: float
    global_batch_size: int
    params_norm: Optional[float] = None
    rejected_results: Optional[int] = None  # skipped by the spike checks so far (result_validation)


@dataclass
class IntervalTotals:
    """Sums over the current log interval; reset after each printed line."""

    losses: Dict[str, torch.Tensor] = field(default_factory=dict)
    advanced: int = 0
    skipped: int = 0
    nan: int = 0

    def add(self, stats: IterationStats) -> None:
        if stats.skipped:
            self.skipped += 1
        else:
            self.advanced += 1
        # As in Megatron, a skipped iteration's loss is not averaged but is looked at for
        # NaN; its gradient norm too, since a skipped step (fp16 overflow) usually has a
        # finite loss and a NaN/Inf gradient norm.
        got_nan = False
        for key, value in stats.losses.items():
            value = value.detach().float()
            got_nan = got_nan or not bool(torch.isfinite(value).all())
            if not stats.skipped:
                self.losses[key] = self.losses.get(key, torch.zeros_like(value)) + value
        if stats.skipped and stats.grad_norm is not None and not math.isfinite(stats.grad_norm):
            got_nan = True
        self.nan += int(got_nan)

    def reset(self) -> None:
        self.losses, self.advanced, self.skipped, self.nan = {}, 0, 0, 0


class TrainingLogger:
    """Prints the iteration line every --log-interval iterations (and for the first one)."""

    def __init__(self, args, writers=None, world_size: int = 1, timers=None, flops_func=None,
                 run_state: Optional[RunState] = None):
        self.args = args
        # The job's counts of skipped and NaN iterations are the run's, kept in its RunState.
        self.run_state = run_state if run_state is not None else RunState()
        self.flops_func = flops_func or num_floating_point_operations
        self.writers = writers
        self.world_size = world_size
        self.timers = timers
        self.totals = IntervalTotals()
        self.memory_reported = False
        self.total_iterations = total_train_iterations(args)

    def should_log(self, iteration: int, first_of_run: bool) -> bool:
        return first_of_run or iteration % self.args.log_interval == 0

    def record(self, iteration: int, stats: IterationStats, consumed_samples: int, elapsed_s: float,
               first_of_run: bool) -> Optional[str]:
        """Add one iteration; return the printed line when this iteration logs, else None.

        ``elapsed_s`` is the wall time since the previous printed line.
        """
        moe_scalars = {}
        if getattr(self.args, "num_experts", None):
            moe = collect_moe_metrics(self.args, parallel_state.get_process_groups())
            stats.losses = {**stats.losses, **moe["losses"]}
            moe_scalars = moe["per_layer"]
        if getattr(self.args, "mtp_num_layers", None):
            stats.losses = {**stats.losses, **collect_mtp_losses(self.args, parallel_state.get_process_groups())}
        nan_before = self.totals.nan
        self.totals.add(stats)
        self.run_state.skipped_iterations += int(stats.skipped)
        self.run_state.nan_iterations += self.totals.nan - nan_before
        self._write_scalars(iteration, stats, consumed_samples, moe_scalars)
        if not self.should_log(iteration, first_of_run):
            return None
        line = self._format(iteration, stats, consumed_samples, elapsed_s)
        self._write_interval_scalars(iteration, stats, consumed_samples, elapsed_s)
        self.totals.reset()
        print_rank_last(line)
        return line

    def _format(self, iteration: int, stats: IterationStats, consumed_samples: int, elapsed_s: float) -> str:
        args, t = self.args, self.totals
        n_iters = max(1, t.advanced + t.skipped)
        ms_per_iter = elapsed_s * 1000.0 / n_iters
        parts = [
            f" [{datetime.now().strftime('%Y-%m-%d %H:%M:%S.%f')}]"
            f" iteration {iteration:8d}/{self.total_iterations:8d} |",
            f" consumed samples: {consumed_samples:12d} |",
            f" elapsed time per iteration (ms): {ms_per_iter:.1f} |",
        ]
        if args.log_throughput:
            parts.append(f" throughput per GPU (TFLOP/s/GPU): {self.tflops(stats.global_batch_size, ms_per_iter):.1f} |")
        if stats.learning_rate is not None:
            parts.append(f" learning rate: {stats.learning_rate:.6E} |")
        parts.append(f" global batch size: {stats.global_batch_size:5d} |")
        for key, total in t.losses.items():
            avg = float(total) / max(1, t.advanced)
            if avg >= 0 or math.isnan(avg):
                parts.append(f" {key}: {avg:.6E} |")
        parts.append(f" loss scale: {stats.loss_scale:.1f} |")
        if stats.grad_norm is not None:
            parts.append(f" grad norm: {stats.grad_norm:.3f} |")
        if stats.num_zeros is not None:
            parts.append(f" num zeros: {stats.num_zeros} |")
        if stats.params_norm is not None:
            parts.append(f" params norm: {stats.params_norm:.3f} |")
        parts.append(f" number of skipped iterations: {t.skipped:3d} |")
        parts.append(f" number of nan iterations: {t.nan:3d} |")
        if stats.rejected_results is not None:
            parts.append(f" number of rejected results: {stats.rejected_results:3d} |")
        # Beyond Megatron's line, appended so that parsers of its fields keep working.
        tokens_per_s = self.tokens_per_second(stats.global_batch_size, ms_per_iter)
        parts.append(f" tokens per second: {tokens_per_s:.0f} |")
        parts.append(f" tokens per second per GPU: {tokens_per_s / max(1, self.world_size):.0f} |")
        eta = eta_seconds(args, iteration, consumed_samples, stats.global_batch_size, ms_per_iter)
        if eta is not None:
            parts.append(f" ETA: {format_duration(eta)} |")
        return "".join(parts)

    def tokens_per_second(self, global_batch_size: int, ms_per_iter: float) -> float:
        return global_batch_size * self.args.seq_length / max(ms_per_iter / 1000.0, 1e-9)

    def tflops(self, global_batch_size: int, ms_per_iter: float) -> float:
        flops = self.flops_func(self.args, global_batch_size)
        return flops / (ms_per_iter / 1000.0 * 1e12 * self.world_size)

    def _write_scalars(self, iteration: int, stats: IterationStats, consumed_samples: int,
                       extra: Optional[Dict[str, float]] = None) -> None:
        if self.writers is None or not self.writers.active:
            return
        if iteration % self.args.tensorboard_log_interval:
            return
        scalars = {"batch-size": float(stats.global_batch_size)}
        if stats.learning_rate is not None:
            scalars["learning-rate"] = stats.learning_rate
        for key, value in stats.losses.items():
            scalars[key] = float(value)
        if getattr(self.args, "log_loss_scale_to_tensorboard", True):  # --no-log-loss-scale-to-tensorboard
            scalars["loss-scale"] = stats.loss_scale
        if stats.grad_norm is not None:
            scalars["grad-norm"] = stats.grad_norm
        if stats.num_zeros is not None:
            scalars["num-zeros"] = float(stats.num_zeros)
        if stats.params_norm is not None:
            scalars["params-norm"] = stats.params_norm
        if getattr(self.args, "log_world_size_to_tensorboard", False):
            scalars["world-size"] = float(self.world_size)
        if getattr(self.args, "log_memory_to_tensorboard", False):
            scalars.update(memory_scalars())
        scalars.update(extra or {})
        self.writers.write(scalars, iteration, consumed_samples)

    def _write_interval_scalars(self, iteration: int, stats: IterationStats, consumed_samples: int,
                                elapsed_s: float) -> None:
        """Scalars measured over a log interval, written when the line is printed (as Megatron
        does): iteration time and timers (--log-timers-to-tensorboard), throughput
        (--log-throughput)."""
        if self.writers is None or not self.writers.active:
            return
        n_iters = max(1, self.totals.advanced + self.totals.skipped)
        ms_per_iter = elapsed_s * 1000.0 / n_iters
        scalars: Dict[str, float] = {}
        if self.args.log_timers_to_tensorboard:
            scalars["iteration-time"] = ms_per_iter / 1000.0
            if self.timers is not None:
                for name, ms in self.timers.elapsed_ms(TIMERS_TO_WRITE, reset=False, normalizer=n_iters).items():
                    scalars[f"{name}-time"] = ms
        if self.args.log_throughput:
            scalars["throughput"] = self.tflops(stats.global_batch_size, ms_per_iter)
            scalars["tokens-per-second"] = self.tokens_per_second(stats.global_batch_size, ms_per_iter)
            scalars["tokens-per-second-per-gpu"] = scalars["tokens-per-second"] / max(1, self.world_size)
        if scalars:
            self.writers.write(scalars, iteration, consumed_samples)


# The timers the training step runs (level 1); written in ms per iteration.
TIMERS_TO_WRITE = ["forward-backward", "optimizer"]


def eta_seconds(args, iteration: int, consumed_samples: int, global_batch_size: int,
                ms_per_iter: float) -> Optional[float]:
    """Seconds to the end of training at the current pace; None when the end is unknown."""
    if args.train_iters:
        remaining = max(0, args.train_iters - iteration)
    elif args.train_samples:
        remaining = math.ceil(max(0, args.train_samples - consumed_samples) / max(1, global_batch_size))
    else:
        return None
    return remaining * ms_per_iter / 1000.0


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (hours grow past 24: ``31:05:00``)."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def memory_scalars() -> Dict[str, float]:
    """Megatron's mem-* TensorBoard scalars from the CUDA caching allocator; none on CPU."""
    if not torch.cuda.is_available():
        return {}
    stats = torch.cuda.memory_stats()
    return {
        "mem-reserved-bytes": float(stats.get("reserved_bytes.all.current", 0)),
        "mem-allocated-bytes": float(stats.get("allocated_bytes.all.current", 0)),
        "mem-max-allocated-bytes": float(stats.get("allocated_bytes.all.peak", 0)),
        "mem-allocated-count": float(stats.get("allocation.all.current", 0)),
    }


def memory_report(rank: int, iteration: int) -> Optional[str]:
    """Megatron's one-time memory line (CUDA only)."""
    if not torch.cuda.is_available():
        return None
    mb = 1024.0 * 1024.0
    return (
        f"[Rank {rank}] (after {iteration} iterations) memory (MB) | "
        f"allocated: {torch.cuda.memory_allocated() / mb} | "
        f"max allocated: {torch.cuda.max_memory_allocated() / mb} | "
        f"reserved: {torch.cuda.memory_reserved() / mb} | "
        f"max reserved: {torch.cuda.max_memory_reserved() / mb}"
    )
