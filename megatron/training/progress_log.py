"""``--log-progress``: Megatron's ``<save>/progress.txt``, one tab-separated line per event.

Each line is ``<date time>\\tJob ID: <SLURM_JOB_ID>\\t# GPUs: <world size>\\t<event>``. A job
appends ``Starting job`` (with the FLOPs done so far, so a later job can compute the
cumulative throughput), ``Saved checkpoint`` after each save (iteration, job and cumulative
TFLOP/s/GPU, floating-point operations and tokens so far) and ``Exiting job``. Only rank 0
writes; nothing is written without ``--save``.
"""

from __future__ import annotations

import os
import re
import time
from datetime import datetime
from typing import Optional, Tuple

import torch.distributed as dist

from megatron.training.run_state import RunState

_STARTING = re.compile(r"^(\S+ \S+)\tJob ID: [^\t]*\t# GPUs: (\d+)\tStarting job\tFloating-point operations: (\S+)")


def _path(args) -> Optional[str]:
    if not args.log_progress or not args.save:
        return None
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    return os.path.join(args.save, "progress.txt")


def append_to_progress_log(args, event: str) -> None:
    """Append one line for ``event`` (rank 0, with --log-progress and --save only)."""
    path = _path(args)
    if path is None:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    with open(path, "a") as f:
        f.write(f"{stamp}\tJob ID: {os.getenv('SLURM_JOB_ID', '')}\t# GPUs: {args.world_size}\t{event}\n")


class ProgressLog:
    """The progress lines of one job; the job's clock starts at construction."""

    def __init__(self, args, run_state: Optional[RunState] = None):
        """``run_state``: the run's counters as this job starts (after a checkpoint load);
        without one, the FLOPs so far are read from ``args``."""
        self.args = args
        self.start_time = time.time()
        state = run_state if run_state is not None else RunState.from_args(args)
        self.start_flops = float(state.floating_point_operations_so_far)
        self.run_start = self._first_start_of_run() if _path(args) else None
        append_to_progress_log(args, f"Starting job\tFloating-point operations: {self.start_flops:.6e}")

    def _first_start_of_run(self) -> Optional[Tuple[float, float]]:
        """(time, FLOPs) of the earliest earlier job in this file with the same GPU count:
        the cumulative throughput is measured from there (a changed world size restarts it)."""
        path = _path(self.args)
        if not os.path.exists(path):
            return None
        found = None
        with open(path) as f:
            for line in f:
                match = _STARTING.match(line)
                if not match:
                    continue
                if int(match.group(2)) != self.args.world_size:
                    found = None
                    continue
                if found is None:
                    when = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S").timestamp()
                    found = (when, float(match.group(3)))
        return found

    def saved_checkpoint(self, iteration: int, flops_so_far: float, consumed_samples: int) -> None:
        now = time.time()
        world = max(1, self.args.world_size)
        job = (flops_so_far - self.start_flops) / max(now - self.start_time, 1e-9) / 1e12 / world
        since, flops_then = self.run_start or (self.start_time, self.start_flops)
        cumulative = (flops_so_far - flops_then) / max(now - since, 1e-9) / 1e12 / world
        tokens = consumed_samples * self.args.seq_length
        append_to_progress_log(
            self.args,
            f"Saved checkpoint\tIteration: {iteration}\tJob throughput: {job:.1f} TFLOP/s/GPU\t"
            f"Cumulative throughput: {cumulative:.1f} TFLOP/s/GPU\t"
            f"Floating-point operations: {flops_so_far:.2e}\tTokens (in billions): {tokens / 1e9:.2f}",
        )

    def exiting(self) -> None:
        append_to_progress_log(self.args, "Exiting job")
