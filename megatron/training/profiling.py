"""--profile: profile training steps --profile-step-start .. --profile-step-end.

With --use-pytorch-profiler, torch.profiler records the steps on each rank of
--profile-ranks; the trace is written to --tensorboard-dir (when given) and a summary line
gives the device time and the share spent in attention kernels. Without it, the CUDA
profiler API is started and stopped around the steps, for `nsys profile
--capture-range=cudaProfilerApi`.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

# Kernel-name fragments of the attention implementations torch dispatches to (cuDNN SDPA,
# flash, memory-efficient/cutlass fmha) and of the plain-math fallback's softmax.
ATTENTION_KERNEL_MARKERS = ("sdpa", "flash", "fmha", "attention")


def _device_time_us(event) -> float:
    for name in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return 0.0


def _is_kernel(event) -> bool:
    """Device-side events only: an operator's own entry also carries the time of the kernels
    it launched, which would count them twice."""
    device_type = getattr(event, "device_type", None)
    return device_type is None or "CPU" not in str(device_type)


def attention_share(key_averages) -> tuple:
    """(total kernel time in ms, attention-kernel time in ms) from ``prof.key_averages()``.

    The total sums kernels on all streams, communication kernels included, so it can exceed
    the wall time when streams overlap."""
    total = attention = 0.0
    for event in key_averages:
        if not _is_kernel(event):
            continue
        t = _device_time_us(event)
        total += t
        if any(m in event.key.lower() for m in ATTENTION_KERNEL_MARKERS):
            attention += t
    return total / 1000.0, attention / 1000.0


class StepProfiler:
    """Starts and stops a profiler at the configured iterations (no-op when off)."""

    def __init__(self, args, rank: int):
        self.enabled = bool(getattr(args, "profile", False)) and rank in (args.profile_ranks or [0])
        self.start_step = args.profile_step_start
        self.end_step = args.profile_step_end
        self.use_torch = bool(getattr(args, "use_pytorch_profiler", False))
        self.trace_dir: Optional[str] = getattr(args, "tensorboard_dir", None)
        self.rank = rank
        self._prof = None
        if self.enabled and self.end_step < self.start_step:
            raise ValueError(
                f"--profile-step-end {self.end_step} is before --profile-step-start {self.start_step}"
            )

    def step_begin(self, iteration: int) -> None:
        """Call before running iteration ``iteration`` (1-based)."""
        if not self.enabled or iteration != self.start_step:
            return
        if self.use_torch:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=activities)
            self._prof.start()
        elif torch.cuda.is_available():
            torch.cuda.cudart().cudaProfilerStart()

    def step_end(self, iteration: int) -> Optional[str]:
        """Call after iteration ``iteration``; returns the summary line when profiling ends."""
        if not self.enabled or iteration != self.end_step:
            return None
        if not self.use_torch:
            if torch.cuda.is_available():
                torch.cuda.cudart().cudaProfilerStop()
            return None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._prof.stop()
        if self.trace_dir:
            os.makedirs(self.trace_dir, exist_ok=True)
            self._prof.export_chrome_trace(os.path.join(self.trace_dir, f"trace_rank{self.rank}.json"))
        total_ms, attention_ms = attention_share(self._prof.key_averages())
        steps = self.end_step - self.start_step + 1
        share = 100.0 * attention_ms / total_ms if total_ms else 0.0
        line = (
            f"[Rank {self.rank}] profile of iterations {self.start_step}-{self.end_step}: kernel time "
            f"{total_ms / steps:.1f} ms/iteration, attention kernels {attention_ms / steps:.1f} ms/iteration "
            f"({share:.1f}%)"
        )
        print(line, flush=True)
        return line
