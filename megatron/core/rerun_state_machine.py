"""Re-run a training step whose result looks wrong, to tell a transient fault from a real one.

A step's results (its loss, its gradient norm) are checked before the optimizer sees them.
When a check rejects a result, ``--rerun-mode validate_results`` runs the same step again on
the same inputs: the same micro-batches (``RerunDataIterator`` replays them) and the same
random states (restored). Then:

- the rerun gives a different result: the first one was not reproducible, a transient fault
  of the hardware (a flipped bit, a bad kernel launch). The machine asks to stop with
  ``EXIT_CODE_FAILED_ON_RESULT_VALIDATION`` (17), as Megatron-LM does, so that the job's
  scheduler can take the node out; the step was not applied.
- the rerun reproduces it: the model or the data really produced it. A fatal check (NaN or
  Inf) stops the run with an error; a non-fatal one (a loss spike, an unusually large
  gradient) skips the step: no update, counted. ``max_consecutive_skips`` skips in a row
  mean the run itself changed (diverged), and stop it with an error.

``report_stats`` re-runs every step once and reports how far the two runs differ (the
determinism of the setup); results are judged as with ``disabled``: no rerun, a fatal
rejection raises, a non-fatal one skips the step.

Megatron-LM goes one step further for a reproducible result: it saves, exits with code 16
and expects the job to be resumed on other GPUs to rerun the step there. Here a result
that reproduces on the same device is taken as real; a checkpoint-and-resume rerun is not
attempted.

Every rank takes the same decision: the rejections are summed over ``group`` (all ranks),
so one rank's bad value makes every rank rerun, skip or stop together.
"""

from __future__ import annotations

import enum
import logging
import math
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron.core.tensor_parallel.collectives import comm_device
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

logger = logging.getLogger(__name__)

# Megatron-LM's exit code for a result that failed validation (a suspected hardware fault).
EXIT_CODE_FAILED_ON_RESULT_VALIDATION = 17

# A loss or gradient norm this many times the largest of the recent accepted ones is a spike
# (Megatron-LM's factor for both checks).
SPIKE_FACTOR = 10.0


class RerunMode(str, enum.Enum):
    DISABLED = "disabled"
    VALIDATE_RESULTS = "validate_results"
    REPORT_STATS = "report_stats"


class Verdict(enum.Enum):
    """What the caller does with the step: apply it, skip it, or stop (exit code 17)."""

    ACCEPT = "accept"
    SKIP = "skip"
    STOP = "stop"


class ResultRejected(RuntimeError):
    """A fatal check rejected a result (and, when validating, the rerun reproduced it)."""


@dataclass
class Check:
    """One named value a step reports and how it is judged: ``fatal`` rejects a NaN/Inf (and
    stops the run when it reproduces); ``spike_factor`` rejects a value that many times the
    largest recent accepted one (a skip). A NaN/Inf under a check that is not fatal passes."""

    fatal: bool
    spike_factor: Optional[float] = None


class SpikeWindow:
    """The last ``size`` accepted values of one check; a value above ``factor`` times their
    maximum is a spike. With no history nothing is a spike."""

    def __init__(self, factor: float, size: int = 100) -> None:
        self.factor = factor
        self.values: deque = deque(maxlen=size)

    def is_spike(self, value: float) -> bool:
        return bool(self.values) and value > self.factor * max(self.values)

    def accept(self, value: float) -> None:
        if math.isfinite(value):
            self.values.append(value)


class RerunErrorInjector:
    """``--error-injection-rate N``: about one step in N gets a corrupted result, to test the
    machinery. ``transient_error`` corrupts only the first run of the step (the rerun is
    clean: a transient fault); ``persistent_error`` and ``correct_result`` corrupt every run of
    it (reproducible). A rate of 0 never injects."""

    KINDS = ("correct_result", "transient_error", "persistent_error")

    def __init__(self, rate: int = 0, kind: str = "transient_error", seed: int = 0) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"--error-injection-type {kind!r}: choose one of {', '.join(self.KINDS)}")
        if rate < 0:
            raise ValueError(f"--error-injection-rate {rate}: give 0 (never) or N > 0 (about one iteration in N)")
        self.rate, self.kind = rate, kind
        self._random = random.Random(seed)
        self.injected = False

    def draw(self) -> None:
        """Decide, at the start of a step, whether this step's results are corrupted."""
        self.injected = self.rate > 0 and self._random.randint(1, self.rate) == 1

    def corrupts(self, rerun: bool) -> bool:
        return self.injected and (not rerun or self.kind != "transient_error")


class RerunDataIterator:
    """Wraps a data iterator so that a step's micro-batches can be read again: ``begin_step``
    forgets the previous step's, ``rewind`` replays this step's from the first."""

    def __init__(self, iterator: Iterator) -> None:
        self.iterator = iterator
        self._saved: List[Any] = []
        self._replay = 0

    def __iter__(self) -> "RerunDataIterator":
        return self

    def __next__(self) -> Any:
        if self._replay < len(self._saved):
            self._replay += 1
            return self._saved[self._replay - 1]
        item = next(self.iterator)
        self._saved.append(item)
        self._replay = len(self._saved)
        return item

    def begin_step(self) -> None:
        self._saved, self._replay = [], 0

    def rewind(self) -> None:
        self._replay = 0


def capture_random_states() -> Dict[str, Any]:
    """Python, NumPy, torch (CPU and CUDA) and the tensor-parallel tracker's states."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "tracker": get_cuda_rng_tracker().get_states()}


def restore_random_states(states: Dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["cpu"])
    if states["cuda"] is not None:
        torch.cuda.set_rng_state_all(states["cuda"])
    get_cuda_rng_tracker().set_states(states["tracker"])


def _same(first: float, second: float, tolerance: float) -> bool:
    if not (math.isfinite(first) and math.isfinite(second)):
        return (math.isnan(first) and math.isnan(second)) or first == second
    return abs(first - second) <= tolerance * max(abs(first), abs(second))


@dataclass
class RerunStateMachine:
    """Runs a step, judges its results, reruns it when asked. ``checks`` names the values a
    step reports; ``on_rejection(iteration, name, status, first, rerun)`` records each
    rejected result (the ``--result-rejected-tracker-filename`` log)."""

    mode: RerunMode = RerunMode.VALIDATE_RESULTS
    checks: Dict[str, Check] = field(default_factory=dict)
    injector: RerunErrorInjector = field(default_factory=RerunErrorInjector)
    tolerance: float = 1e-5
    max_consecutive_skips: int = 10
    group: Any = None
    on_rejection: Optional[Callable[[int, str, str, float, Optional[float]], None]] = None
    rejected_total: int = 0
    skipped_in_a_row: int = 0
    largest_rerun_difference: Dict[str, float] = field(default_factory=dict)
    report_interval: int = 100
    _compared_steps: int = 0

    def __post_init__(self) -> None:
        self.mode = RerunMode(self.mode)
        self.windows = {name: SpikeWindow(c.spike_factor) for name, c in self.checks.items() if c.spike_factor}

    def run_step(self, iteration: int, forward_backward: Callable[[], Dict[str, float]],
                 iterators: List[RerunDataIterator]) -> Verdict:
        """Run ``forward_backward`` (which zeroes the gradients, runs the step's micro-batches
        and returns the checked values) once, or twice when a result is rejected."""
        for iterator in iterators:
            iterator.begin_step()
        states = capture_random_states() if self.mode != RerunMode.DISABLED else None
        self.injector.draw()
        first = self._corrupted(forward_backward(), rerun=False)
        rejected = self._rejected(first)
        fatal, any_rejected = self._agree(rejected)
        rerun_wanted = self.mode == RerunMode.REPORT_STATS or (any_rejected and self.mode == RerunMode.VALIDATE_RESULTS)
        if not rerun_wanted:
            return self._judge(iteration, first, None, rejected, fatal, any_rejected)
        restore_random_states(states)
        for iterator in iterators:
            iterator.rewind()
        if any_rejected and self.mode == RerunMode.VALIDATE_RESULTS:
            logger.warning("iteration %d: result rejected (%s); re-running the iteration to check that it "
                           "reproduces", iteration, ", ".join(rejected) or "on another rank")
        second = self._corrupted(forward_backward(), rerun=True)
        if self.mode == RerunMode.REPORT_STATS:
            self._record_differences(first, second)
            return self._judge(iteration, first, None, rejected, fatal, any_rejected)
        differs = [name for name in first if not _same(first[name], second.get(name, math.nan), self.tolerance)]
        if self._sum_over_ranks(len(differs)) > 0:
            for name in rejected or differs:
                self._record(iteration, name, "first_rerun_not_reproducible", first.get(name), second.get(name))
            logger.error("iteration %d: the rejected result did not reproduce when the iteration was re-run "
                         "(%s): a transient fault of this machine is suspected; stopping with exit code %d",
                         iteration, ", ".join(f"{n}: {first[n]!r} then {second.get(n)!r}" for n in differs) or
                         "on another rank", EXIT_CODE_FAILED_ON_RESULT_VALIDATION)
            return Verdict.STOP
        return self._judge(iteration, first, second, rejected, fatal, any_rejected)

    def _corrupted(self, values: Dict[str, float], rerun: bool) -> Dict[str, float]:
        """The injected error: a NaN where a fatal check looks, else a value 1000 spike factors up."""
        if not self.injector.corrupts(rerun) or not values:
            return values
        values = dict(values)
        name = next((n for n in values if self.checks.get(n, Check(False)).fatal), None)
        if name is not None:
            values[name] = math.nan
        else:
            name = next(iter(values))
            values[name] = abs(values[name]) * SPIKE_FACTOR * 1000 + 1.0
        return values

    def _rejected(self, values: Dict[str, float]) -> Dict[str, bool]:
        """The rejected values' names, each with whether its rejection is fatal (a non-finite
        value under a fatal check; a spike never is)."""
        rejected = {}
        for name, value in values.items():
            check = self.checks.get(name)
            if check is None:
                continue
            window = self.windows.get(name)
            if not math.isfinite(value):
                # Without a fatal check a NaN/Inf is someone else's signal: fp16 loss scaling
                # halves its scale on it, which it could not do if the step never reached it.
                if check.fatal:
                    rejected[name] = True
            elif window is not None and window.is_spike(value):
                rejected[name] = False
        return rejected

    def _agree(self, rejected: Dict[str, bool]) -> tuple:
        fatal = sum(1 for is_fatal in rejected.values() if is_fatal)
        table = self._sum_over_ranks([fatal, len(rejected)])
        return table[0] > 0, table[1] > 0

    def _sum_over_ranks(self, values):
        one = not isinstance(values, list)
        numbers = [values] if one else values
        if not dist.is_initialized():
            return numbers[0] if one else numbers
        tensor = torch.tensor(numbers, dtype=torch.float64, device=comm_device(self.group))
        dist.all_reduce(tensor, group=self.group)
        out = [int(v) for v in tensor.tolist()]
        return out[0] if one else out

    def _judge(self, iteration: int, first: Dict[str, float], second: Optional[Dict[str, float]],
               rejected: Dict[str, bool], fatal: bool, any_rejected: bool) -> Verdict:
        status = "first_rerun_reproducible" if second is not None else "rerun_disabled"
        for name in rejected:
            self._record(iteration, name, status, first[name], None if second is None else second.get(name))
        if fatal:
            reproduced = " (the re-run of the iteration reproduced it)" if second is not None else ""
            bad = [name for name, is_fatal in rejected.items() if is_fatal]
            raise ResultRejected(f"iteration {iteration}: NaN or Inf in {', '.join(bad) or 'another rank'}"
                                 f"{reproduced}")
        if not any_rejected:
            self.skipped_in_a_row = 0
            for name, window in self.windows.items():
                if name in first:
                    window.accept(first[name])
            return Verdict.ACCEPT
        self.rejected_total += 1
        self.skipped_in_a_row += 1
        if self.skipped_in_a_row >= self.max_consecutive_skips:
            raise ResultRejected(
                f"iteration {iteration}: {self.skipped_in_a_row} iterations in a row were skipped for an "
                f"unexpectedly large {', '.join(rejected) or 'value on another rank'} (over {SPIKE_FACTOR:g} times "
                "the largest of the recent ones): the run has diverged. Resume from an earlier checkpoint with a "
                "lower --lr, or leave out --check-for-spiky-loss / --check-for-large-grads to train through it.")
        logger.warning("iteration %d: skipped, unexpectedly large %s (%d skipped so far)", iteration,
                       ", ".join(f"{n} {first[n]:.4g}" for n in rejected) or "value on another rank",
                       self.rejected_total)
        return Verdict.SKIP

    def _record(self, iteration: int, name: str, status: str, first: Optional[float], rerun: Optional[float]) -> None:
        if self.on_rejection is not None:
            self.on_rejection(iteration, name, status, first, rerun)

    def _record_differences(self, first: Dict[str, float], second: Dict[str, float]) -> None:
        for name, value in first.items():
            other = second.get(name, math.nan)
            gap = abs(value - other) if math.isfinite(value) and math.isfinite(other) else math.inf
            if not (math.isnan(value) and math.isnan(other)):
                self.largest_rerun_difference[name] = max(self.largest_rerun_difference.get(name, 0.0), gap)
        self._compared_steps += 1
        if self._compared_steps % self.report_interval == 0:
            logger.info("rerun determinism over %d iterations: largest difference between the two runs of an "
                        "iteration: %s", self._compared_steps,
                        ", ".join(f"{n} {v:.3e}" for n, v in self.largest_rerun_difference.items()))
