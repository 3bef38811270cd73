"""Named wall-clock timers with Megatron's levels and cross-rank (min, max) report.

The ranks a report covers (and a timer's optional barrier waits for) are one process
group, passed to ``Timers``; ``None`` means torch.distributed's world group, stated
here because it is the default, not because anything falls back to it."""

from __future__ import annotations

import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist


def _synchronize() -> None:
    # Device work is asynchronous; a host clock only means something after a sync.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier(group) -> None:
    """Forward: returns once every rank of ``group`` (None: the world) reached it; nothing
    without torch.distributed. Backward: none."""
    if _distributed():
        dist.barrier(group=group)


def _min_and_max(values: torch.Tensor, group) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward: the element-wise minimum and maximum of ``values`` over the ranks of
    ``group`` (None: the world), out of place; ``values`` itself for a single rank.
    Backward: none (timings carry no gradient)."""
    if not _distributed() or dist.get_world_size(group) == 1:
        return values, values
    lo, hi = values.clone(), values.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    return lo, hi


class Timer:
    """Accumulates elapsed seconds between start() and stop() calls; ``barrier=True``
    first waits for the ranks of ``group`` (None: the world)."""

    def __init__(self, name: str, group=None):
        self.name = name
        self.group = group
        self._elapsed = 0.0
        self._started: Optional[float] = None

    def start(self, barrier: bool = False) -> None:
        if self._started is not None:
            raise RuntimeError(f"timer {self.name!r} was started twice")
        if barrier:
            _barrier(self.group)
        _synchronize()
        self._started = time.perf_counter()

    def stop(self, barrier: bool = False) -> None:
        if self._started is None:
            raise RuntimeError(f"timer {self.name!r} was stopped without being started")
        if barrier:
            _barrier(self.group)
        _synchronize()
        self._elapsed += time.perf_counter() - self._started
        self._started = None

    def reset(self) -> None:
        self._elapsed = 0.0
        self._started = None

    def elapsed(self, reset: bool = True) -> float:
        """Seconds accumulated so far (a running timer is read without stopping it)."""
        running = self._started is not None
        if running:
            self.stop()
        value = self._elapsed
        if reset:
            self._elapsed = 0.0
        if running:
            self.start()
        return value


class _NullTimer:
    def start(self, barrier: bool = False) -> None:
        pass

    def stop(self, barrier: bool = False) -> None:
        pass

    def reset(self) -> None:
        pass

    def elapsed(self, reset: bool = True) -> float:
        return 0.0


class Timers:
    """``timers(name, log_level)`` returns a timer, or a no-op one above ``log_level``.

    ``group`` is the process group the timers' barriers and the (min, max) report span;
    None (the default) is torch.distributed's world group."""

    def __init__(self, log_level: int = 0, log_option: str = "minmax", group=None):
        if log_option not in ("max", "minmax", "all"):
            raise ValueError(f"--timing-log-option must be max, minmax or all, got {log_option!r}")
        self.log_level = log_level
        self.log_option = log_option
        self.group = group
        self._timers: Dict[str, Timer] = {}
        self._null = _NullTimer()

    def __call__(self, name: str, log_level: int = 0):
        if log_level > self.log_level:
            return self._null
        if name not in self._timers:
            self._timers[name] = Timer(name, self.group)
        return self._timers[name]

    def elapsed_ms(self, names: List[str], reset: bool = True, normalizer: float = 1.0) -> Dict[str, float]:
        return {n: self._timers[n].elapsed(reset) * 1000.0 / normalizer for n in names if n in self._timers}

    def log_string(self, names: List[str], normalizer: float = 1.0, reset: bool = True) -> Optional[str]:
        """The '(min, max) time across ranks (ms):' block; every rank of the group must call it."""
        local = self.elapsed_ms(names, reset, normalizer)
        keys = [n for n in names if n in local]
        if not keys:
            return None
        device = "cpu"
        if _distributed() and dist.get_backend(self.group) != "gloo" and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        values = torch.tensor([local[k] for k in keys], dtype=torch.float64, device=device)
        lo, hi = _min_and_max(values, self.group)
        if self.log_option == "max":
            lines = [f"    {k}: {h:.2f}" for k, h in zip(keys, hi.tolist())]
            return "max time across ranks (ms):\n" + "\n".join(lines)
        lines = [f"    {k}: ({l:.2f}, {h:.2f})" for k, l, h in zip(keys, lo.tolist(), hi.tolist())]
        return "(min, max) time across ranks (ms):\n" + "\n".join(lines)
