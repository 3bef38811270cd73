"""Megatron's iteration log line, its interval bookkeeping, and the scalars for writers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Dict, Optional

import torch

from megatron.core import parallel_state
from megatron.training.flops import num_floating_point_operations
from megatron.training.moe_metrics import collect_moe_metrics
from megatron.training.rank_print import print_rank_last


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

    def __init__(self, args, writers=None, world_size: int = 1):
        self.args = args
        self.writers = writers
        self.world_size = world_size
        self.totals = IntervalTotals()
        self.total_skipped = 0
        self.total_nan = 0
        self.memory_reported = False

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
        self.totals.add(stats)
        self.total_skipped += int(stats.skipped)
        self._write_scalars(iteration, stats, consumed_samples, moe_scalars)
        if not self.should_log(iteration, first_of_run):
            return None
        line = self._format(iteration, stats, consumed_samples, elapsed_s)
        self.total_nan += self.totals.nan
        self.totals.reset()
        print_rank_last(line)
        return line

    def _format(self, iteration: int, stats: IterationStats, consumed_samples: int, elapsed_s: float) -> str:
        args, t = self.args, self.totals
        n_iters = max(1, t.advanced + t.skipped)
        ms_per_iter = elapsed_s * 1000.0 / n_iters
        parts = [
            f" [{datetime.now().strftime('%Y-%m-%d %H:%M:%S.%f')}]"
            f" iteration {iteration:8d}/{args.train_iters or 0:8d} |",
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
        return "".join(parts)

    def tflops(self, global_batch_size: int, ms_per_iter: float) -> float:
        flops = num_floating_point_operations(self.args, global_batch_size)
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
        scalars.update(extra or {})
        self.writers.write(scalars, iteration, consumed_samples)


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
