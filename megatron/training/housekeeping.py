"""Python garbage collection and the CUDA caching allocator at fixed points of the loop.

``--manual-gc``: Python's automatic collector runs whenever allocation counts cross its
thresholds, which in a training loop means at a different moment on every rank; a rank
that collects stalls the collectives of all the others. With manual GC the automatic
collector is off and every rank collects at the same iterations (every
``--manual-gc-interval``, 0 = never during training) and, unless ``--no-manual-gc-eval``,
at the start and end of each evaluation. Automatic collection is restored when training
ends.

``--empty-unused-memory-level``: 1 returns cached, unused CUDA blocks to the driver after
each forward-backward (and each evaluation batch), 2 also after the optimizer step (as in
Megatron: it trades speed for headroom when other processes share the GPU).
"""

from __future__ import annotations

import argparse
import gc

import torch


class ManualGC:
    """Garbage collection at the same iterations on every rank (``--manual-gc``)."""

    def __init__(self, args: argparse.Namespace):
        self.enabled = bool(args.manual_gc)
        self.interval = int(args.manual_gc_interval or 0)
        self.around_eval = bool(args.manual_gc_eval)
        self._was_enabled = gc.isenabled()

    def start(self) -> None:
        if self.enabled:
            gc.disable()
            gc.collect()

    def after_iteration(self, iteration: int) -> None:
        if self.enabled and self.interval and iteration % self.interval == 0:
            gc.collect()

    def at_evaluation(self) -> None:
        """At the start and at the end of an evaluation run."""
        if self.enabled and self.around_eval:
            gc.collect()

    def stop(self) -> None:
        if self.enabled and self._was_enabled:
            gc.enable()


def empty_unused_memory(args: argparse.Namespace, level: int) -> None:
    """Release the CUDA allocator's cached blocks when --empty-unused-memory-level >= ``level``."""
    if args.empty_unused_memory_level >= level and torch.cuda.is_available():
        torch.cuda.empty_cache()
