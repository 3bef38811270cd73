"""--profile: profile training steps --profile-step-start .. --profile-step-end.

With --use-pytorch-profiler, torch.profiler records the steps on each rank of
--profile-ranks; the trace is written to --tensorboard-dir (when given) and a summary line
gives the device time and the share spent in attention kernels. A block follows it: the
device time per iteration by kernel category, how busy the device was over the profiled
steps' wall time, and the kernels that took the most time; with --tensorboard-dir the same
numbers go to profile_rank{R}.json next to the trace. Without --use-pytorch-profiler, the
CUDA profiler API is started and stopped around the steps, for `nsys profile
--capture-range=cudaProfilerApi`.
"""

from __future__ import annotations

import json
import os
import time
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import torch

# Kernel-name fragments of the attention implementations torch dispatches to (cuDNN SDPA,
# flash, memory-efficient/cutlass fmha) and of the plain-math fallback's softmax.
ATTENTION_KERNEL_MARKERS = ("sdpa", "flash", "fmha", "attention")

# Kernel categories: (category, lower-case name fragments). The first category with a
# fragment in the kernel's lower-cased name wins, so the order matters: communication and
# attention come before gemm because their kernels carry gemm-like names (sm90_, wgmma);
# torch.compile's fused kernels (triton_) come before copies because their names list the
# fused ops (_to_copy). Extend by adding fragments or categories here.
KERNEL_CATEGORIES: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("communication", ("nccl",)),
    ("attention", ATTENTION_KERNEL_MARKERS + ("attn", "cudnn")),
    ("gemm", ("gemm", "xmma", "cutlass", "sm90_", "sm80_", "cublas", "ampere_", "nvjet", "gemv", "matmul")),
    ("optimizer", ("multi_tensor", "foreach", "adam")),
    ("softmax/cross-entropy", ("log_softmax", "softmax", "nll", "cross_entropy")),
    ("compiled (triton)", ("triton_",)),
    # "catarray" (torch.cat's CatArrayBatchedCopy) rather than "cat", which scatter kernels contain.
    ("copies", ("memcpy", "memset", "copy_", "catarray", "fill")),
    ("other elementwise", ("elementwise", "vectorized", "reduce", "unrolled")),
)
OTHER_CATEGORY = "other"
TOP_KERNELS = 12
KERNEL_NAME_WIDTH = 90
# Every line of the breakdown block starts with "[Rank R] " + this, so logs can be grepped.
BLOCK_PREFIX = "profile |"


def categorise(name: str) -> str:
    """The KERNEL_CATEGORIES category of one kernel name (OTHER_CATEGORY when none matches)."""
    lowered = name.lower()
    for category, fragments in KERNEL_CATEGORIES:
        if any(fragment in lowered for fragment in fragments):
            return category
    return OTHER_CATEGORY


def merged_busy_time(intervals: Iterable[Tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: time during which at least one kernel
    ran, whatever the stream, so kernels overlapping on several streams count once."""
    busy = 0.0
    current_start = current_end = None
    for start, end in sorted(intervals):
        if end <= start:
            continue
        if current_end is None or start > current_end:
            if current_end is not None:
                busy += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        busy += current_end - current_start
    return busy


class Kernel(NamedTuple):
    """One device activity (kernel, memcpy, memset) with its times in microseconds."""

    name: str
    start_us: float
    end_us: float


def _device_time_us(event) -> float:
    for name in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return 0.0


def _is_kernel(event) -> bool:
    """Device-side events only: an operator's own entry also carries the time of the kernels
    it launched, which would count them twice, and a device-side user annotation spans the
    kernels run inside it."""
    if getattr(event, "is_user_annotation", False) or getattr(event, "activity_type", None) == "gpu_user_annotation":
        return False
    device_type = getattr(event, "device_type", None)
    return device_type is None or "CPU" not in str(device_type)


def device_kernels(events) -> List[Kernel]:
    """The device activities among ``prof.events()`` (kernels, memcpys, memsets)."""
    out = []
    for event in events:
        if getattr(event, "device_type", None) is None or not _is_kernel(event):
            continue
        time_range = event.time_range
        out.append(Kernel(event.name, float(time_range.start), float(time_range.end)))
    return out


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


def breakdown(kernels: Sequence[Kernel], steps: int, wall_ms: Optional[float] = None, top: int = TOP_KERNELS) -> Dict:
    """Per-iteration device-time breakdown of ``steps`` profiled iterations.

    ``wall_ms`` is the steps' wall time (CPU clock, device synchronized at both ends); without
    it the window is the span from the first kernel's start to the last one's end. Kernel
    time sums all streams, so it can exceed the busy time when streams overlap."""
    steps = max(int(steps), 1)
    total_us = sum(k.end_us - k.start_us for k in kernels)
    categories: Dict[str, float] = {name: 0.0 for name, _ in KERNEL_CATEGORIES}
    categories[OTHER_CATEGORY] = 0.0
    per_name: Dict[str, List[float]] = {}
    for k in kernels:
        duration = k.end_us - k.start_us
        categories[categorise(k.name)] += duration
        entry = per_name.setdefault(k.name, [0.0, 0])
        entry[0] += duration
        entry[1] += 1
    busy_us = merged_busy_time((k.start_us, k.end_us) for k in kernels)
    span_us = (max(k.end_us for k in kernels) - min(k.start_us for k in kernels)) if kernels else 0.0
    window_us = wall_ms * 1000.0 if wall_ms else span_us

    def share(us: float) -> float:
        return 100.0 * us / total_us if total_us else 0.0

    ranked = sorted(per_name.items(), key=lambda item: item[1][0], reverse=True)[:top]
    return {
        "iterations": steps,
        "kernels_recorded": len(kernels),
        "kernel_ms_per_iteration": total_us / 1000.0 / steps,
        "wall_ms_per_iteration": window_us / 1000.0 / steps,
        "wall_source": "cpu clock" if wall_ms else "kernel span",
        "kernel_span_ms_per_iteration": span_us / 1000.0 / steps,
        "busy_ms_per_iteration": busy_us / 1000.0 / steps,
        "idle_ms_per_iteration": max(window_us - busy_us, 0.0) / 1000.0 / steps,
        "busy_percent": 100.0 * busy_us / window_us if window_us else 0.0,
        "categories": [
            {"category": name, "ms_per_iteration": us / 1000.0 / steps, "percent": share(us)}
            for name, us in sorted(categories.items(), key=lambda item: item[1], reverse=True) if us > 0
        ],
        "top_kernels": [
            {"name": name, "category": categorise(name), "ms_per_iteration": us / 1000.0 / steps,
             "calls_per_iteration": count / steps, "percent": share(us)}
            for name, (us, count) in ranked
        ],
    }


def _shorten(name: str, width: int = KERNEL_NAME_WIDTH) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."


def format_breakdown(report: Dict, rank: int) -> List[str]:
    """The breakdown block's lines, each starting with "[Rank R] profile |"."""
    head = f"[Rank {rank}] {BLOCK_PREFIX}"
    if not report["kernels_recorded"]:
        return [f"{head} no device kernels recorded (wall {report['wall_ms_per_iteration']:.1f} ms/iteration)"]
    busy = (
        f"{head} GPU busy {report['busy_percent']:.1f}% of wall, idle {report['idle_ms_per_iteration']:.1f} "
        f"ms/iteration (wall {report['wall_ms_per_iteration']:.1f} ms/iteration by {report['wall_source']}, "
        f"busy {report['busy_ms_per_iteration']:.1f}, kernels summed over streams "
        f"{report['kernel_ms_per_iteration']:.1f})"
    )
    lines = [busy, f"{head} device time by category: ms/iteration, share of kernel time"]
    width = max(len(c["category"]) for c in report["categories"])
    for c in report["categories"]:
        lines.append(f"{head}   {c['category']:<{width}} {c['ms_per_iteration']:9.2f} {c['percent']:5.1f}%")
    lines.append(f"{head} top {len(report['top_kernels'])} kernels: ms/iteration, calls/iteration, share, name")
    for k in report["top_kernels"]:
        lines.append(f"{head}   {k['ms_per_iteration']:9.2f} {k['calls_per_iteration']:7.1f} {k['percent']:5.1f}%  "
                     f"{_shorten(k['name'])}")
    return lines


class StepProfiler:
    """Starts and stops a profiler at the configured iterations (no-op when off)."""

    def __init__(self, args, rank: int):
        self.enabled = bool(args.profile) and rank in (args.profile_ranks or [0])
        self.start_step = args.profile_step_start
        self.end_step = args.profile_step_end
        self.use_torch = bool(args.use_pytorch_profiler)
        self.trace_dir: Optional[str] = args.tensorboard_dir
        self.rank = rank
        self._prof = None
        self._wall_start: Optional[float] = None
        self.report: Optional[Dict] = None
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
            # The wall clock starts with an idle device, so earlier steps' kernels do not count.
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._wall_start = time.perf_counter()
        elif torch.cuda.is_available():
            torch.cuda.cudart().cudaProfilerStart()

    def step_end(self, iteration: int) -> Optional[str]:
        """Call after iteration ``iteration``; returns the summary line when profiling ends
        (the breakdown block is printed after it and kept in ``self.report``)."""
        if not self.enabled or iteration != self.end_step:
            return None
        if not self.use_torch:
            if torch.cuda.is_available():
                torch.cuda.cudart().cudaProfilerStop()
            return None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - self._wall_start) * 1000.0
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
        self.report = breakdown(device_kernels(self._prof.events()), steps, wall_ms)
        self.report.update(rank=self.rank, start_step=self.start_step, end_step=self.end_step)
        print("\n".join([line] + format_breakdown(self.report, self.rank)), flush=True)
        if self.trace_dir:
            with open(os.path.join(self.trace_dir, f"profile_rank{self.rank}.json"), "w") as f:
                json.dump(self.report, f, indent=2)
        return line
