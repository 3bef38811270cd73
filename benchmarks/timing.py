"""Milliseconds per call of a step, for the kernel-level benchmarks."""

from __future__ import annotations

import time
from typing import Callable

import torch


def ms_per_call(step: Callable[[], None], repeats: int, cuda: bool = True, warmup: int = 3) -> float:
    """Mean milliseconds per call of ``step`` over ``repeats`` calls, after ``warmup``
    untimed ones (compilation, autotuning, allocator growth). ``cuda``: timed with CUDA
    events around the calls (GPU time of the queued work), else with the host clock."""
    for _ in range(warmup):
        step()
    if not cuda:
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        return (time.perf_counter() - start) * 1000.0 / repeats
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    begin.record()
    for _ in range(repeats):
        step()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / repeats
