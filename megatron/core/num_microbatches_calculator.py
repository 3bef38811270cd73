"""How many micro-batches make one global batch, with optional batch-size ramp-up or step schedule.

num_microbatches = global_batch_size / (micro_batch_size * data_parallel_size).

The module-level calculator and its accessors (``init_num_microbatches_calculator``,
``get_num_microbatches``, ...) are Megatron-Core's public API, kept here so that user
scripts port unchanged; this file is the only place holding that state.
"""

from __future__ import annotations

import logging
from typing import List, Optional, Sequence, Tuple, Union

logger = logging.getLogger(__name__)

_GLOBAL_NUM_MICROBATCHES_CALCULATOR: Optional["NumMicroBatchesCalculator"] = None


def _check_positive(flag: str, value) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{flag} must be a positive integer, got {value!r}")


def _running_global_batch_size(
    global_batch_size: int, micro_times_dp: int, decrease_batch_size_if_needed: bool, consistency_check: bool
) -> int:
    """The batch actually run: ``global_batch_size``, or rounded down to a multiple of
    micro_batch_size * data_parallel_size when --decrease-batch-size-if-needed."""
    if decrease_batch_size_if_needed:
        running = (global_batch_size // micro_times_dp) * micro_times_dp
        if running == 0:
            running = micro_times_dp
        return running
    if consistency_check and global_batch_size % micro_times_dp:
        raise ValueError(
            f"--global-batch-size {global_batch_size} is not divisible by --micro-batch-size x "
            f"data-parallel size = {micro_times_dp}: the rule is global_batch_size % "
            "(micro_batch_size * data_parallel_size) == 0; change --global-batch-size or "
            "--micro-batch-size, or pass --decrease-batch-size-if-needed"
        )
    return global_batch_size


class NumMicroBatchesCalculator:
    """Base: holds the current number of micro-batches and global batch size."""

    def __init__(self) -> None:
        self.num_micro_batches: Optional[int] = None
        self.current_global_batch_size: Optional[int] = None
        self.current_running_global_batch_size: Optional[int] = None
        self.micro_batch_size: Optional[int] = None

    def get(self) -> int:
        return self.num_micro_batches

    def get_current_global_batch_size(self) -> int:
        return self.current_global_batch_size

    def get_current_running_global_batch_size(self) -> int:
        return self.current_running_global_batch_size

    def get_micro_batch_size(self) -> int:
        return self.micro_batch_size

    def update(self, consumed_samples: int, consistency_check: bool, verbose: bool = False) -> None:
        raise NotImplementedError


class ConstantNumMicroBatchesCalculator(NumMicroBatchesCalculator):
    """A fixed global batch size for the whole run."""

    def __init__(
        self,
        global_batch_size: int,
        micro_batch_size: int,
        data_parallel_size: int,
        decrease_batch_size_if_needed: bool = False,
        rank: int = 0,
    ) -> None:
        super().__init__()
        _check_positive("--global-batch-size", global_batch_size)
        _check_positive("--micro-batch-size", micro_batch_size)
        _check_positive("data-parallel size", data_parallel_size)
        micro_times_dp = micro_batch_size * data_parallel_size
        running = _running_global_batch_size(
            global_batch_size, micro_times_dp, decrease_batch_size_if_needed, consistency_check=True
        )
        self.num_micro_batches = running // micro_times_dp
        self.current_global_batch_size = global_batch_size
        self.current_running_global_batch_size = running
        self.micro_batch_size = micro_batch_size
        if rank == 0 and running != global_batch_size:
            logger.info(
                "decreased global batch size from %d to %d (a multiple of micro batch size %d x "
                "data-parallel size %d)", global_batch_size, running, micro_batch_size, data_parallel_size,
            )

    def update(self, consumed_samples: int, consistency_check: bool, verbose: bool = False) -> None:
        """Nothing changes with a constant batch size."""


class RampupBatchsizeNumMicroBatchesCalculator(NumMicroBatchesCalculator):
    """Global batch grows from ``start_global_batch_size`` by ``batch_size_increment``
    every ``ramup_samples / num_increments`` consumed samples (--rampup-batch-size
    <start> <incr> <samples>), reaching ``global_batch_size`` after ``ramup_samples``."""

    def __init__(
        self,
        global_batch_size: int,
        micro_batch_size: int,
        data_parallel_size: int,
        decrease_batch_size_if_needed: bool,
        rank: int,
        start_global_batch_size: int,
        batch_size_increment: int,
        ramup_samples: int,
    ) -> None:
        super().__init__()
        _check_positive("--global-batch-size", global_batch_size)
        _check_positive("--micro-batch-size", micro_batch_size)
        _check_positive("data-parallel size", data_parallel_size)
        _check_positive("--rampup-batch-size <start>", start_global_batch_size)
        _check_positive("--rampup-batch-size <incr>", batch_size_increment)
        if not isinstance(ramup_samples, int) or ramup_samples < 0:
            raise ValueError(f"--rampup-batch-size <samples> must be a non-negative integer, got {ramup_samples!r}")
        diff = global_batch_size - start_global_batch_size
        if diff < 0:
            raise ValueError(
                f"--rampup-batch-size start {start_global_batch_size} is larger than "
                f"--global-batch-size {global_batch_size}: the ramp-up must grow towards the "
                "global batch size; lower the start or raise --global-batch-size"
            )
        if diff % batch_size_increment:
            raise ValueError(
                f"--global-batch-size {global_batch_size} minus --rampup-batch-size start "
                f"{start_global_batch_size} = {diff} is not divisible by the increment "
                f"{batch_size_increment}; choose sizes so that the ramp-up lands exactly on the "
                "global batch size"
            )
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.data_parallel_size = data_parallel_size
        self.micro_batch_times_data_parallel_size = micro_batch_size * data_parallel_size
        self.decrease_batch_size_if_needed = decrease_batch_size_if_needed
        self.rank = rank
        self.start_global_batch_size = start_global_batch_size
        self.batch_size_increment = batch_size_increment
        self.ramup_samples = ramup_samples
        num_increments = diff // batch_size_increment
        # With no increment to make, the ramp-up is over at once.
        self.rampup_samples_per_increment = ramup_samples / num_increments if num_increments else 0.0
        if rank == 0:
            logger.info(
                "batch size ramp-up: start %d, increment %d, over %d samples (%.1f samples per increment)",
                start_global_batch_size, batch_size_increment, ramup_samples, self.rampup_samples_per_increment,
            )
        self.update(0, consistency_check=False)

    def update(self, consumed_samples: int, consistency_check: bool, verbose: bool = False) -> None:
        """Set the batch size for the step that starts after ``consumed_samples``."""
        if consumed_samples > self.ramup_samples or self.rampup_samples_per_increment == 0:
            current = self.global_batch_size
        else:
            steps = int(consumed_samples / self.rampup_samples_per_increment)
            current = min(self.start_global_batch_size + steps * self.batch_size_increment, self.global_batch_size)
        changed = current != self.current_global_batch_size
        self.current_global_batch_size = current
        self.current_running_global_batch_size = _running_global_batch_size(
            current, self.micro_batch_times_data_parallel_size, self.decrease_batch_size_if_needed, consistency_check
        )
        self.num_micro_batches = max(
            1, self.current_running_global_batch_size // self.micro_batch_times_data_parallel_size
        )
        if verbose and changed and self.rank == 0:
            logger.info(
                "global batch size %d (running %d) after %d consumed samples: %d micro-batches",
                current, self.current_running_global_batch_size, consumed_samples, self.num_micro_batches,
            )


_SUFFIXES = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


def _schedule_number(text: str, entry: str) -> int:
    """``250B`` -> 250_000_000_000; suffixes K, M, B, T (powers of 1000)."""
    text = text.strip().upper()
    scale = _SUFFIXES.get(text[-1:], 1)
    digits = text[:-1] if scale != 1 else text
    try:
        return int(float(digits) * scale)
    except ValueError:
        raise ValueError(f"--step-batch-size-schedule entry {entry!r}: {text!r} is not a number "
                         "(digits with an optional K, M, B or T suffix)") from None


def parse_step_batch_size_schedule(schedule: str, seq_length: Optional[int] = None) -> List[Tuple[int, int]]:
    """``"0:768 250B:1536"`` -> ``[(0, 768), (250e9 // seq_length, 1536)]``: (threshold in
    samples, global batch size) pairs sorted by threshold. Entries are separated by spaces or
    commas; with ``seq_length`` the thresholds are tokens, converted to samples by floor division.
    Raises ValueError unless the first threshold is 0, thresholds strictly increase and every
    batch size is positive."""
    pairs = []
    for entry in schedule.replace(",", " ").split():
        if ":" not in entry:
            raise ValueError(f"--step-batch-size-schedule entry {entry!r} is not THRESHOLD:BATCH_SIZE "
                             "(e.g. \"0:768 250B:1536\")")
        threshold, batch = entry.split(":", 1)
        threshold = _schedule_number(threshold, entry)
        pairs.append((threshold // seq_length if seq_length else threshold, _schedule_number(batch, entry)))
    pairs.sort(key=lambda pair: pair[0])
    if not pairs or pairs[0][0] != 0:
        raise ValueError(f"--step-batch-size-schedule {schedule!r} must start with a threshold of 0 "
                         "(the batch size of the first step), e.g. \"0:768 ...\"")
    for (t0, _), (t1, _) in zip(pairs, pairs[1:]):
        if t1 <= t0:
            raise ValueError(f"--step-batch-size-schedule {schedule!r}: thresholds must increase strictly "
                             f"(after conversion to samples, {t0} is followed by {t1})")
    for _, batch in pairs:
        if batch < 1:
            raise ValueError(f"--step-batch-size-schedule {schedule!r}: batch size {batch} must be positive")
    return pairs


class StepBatchsizeNumMicroBatchesCalculator(NumMicroBatchesCalculator):
    """Global batch size set by consumed samples from a step schedule
    (--step-batch-size-schedule): the batch size of the last threshold <= consumed samples.

    Only the current batch size must be divisible by micro_batch_size x data-parallel size
    (checked by ``update`` with ``consistency_check``), so a run can move to more ranks
    between steps. Nothing is kept between updates: a resumed run, given its consumed
    samples, picks up the schedule where it stopped."""

    def __init__(self, micro_batch_size: int, data_parallel_size: int, rank: int, schedule: str,
                 seq_length: Optional[int] = None) -> None:
        super().__init__()
        _check_positive("--micro-batch-size", micro_batch_size)
        _check_positive("data-parallel size", data_parallel_size)
        self.schedule = parse_step_batch_size_schedule(schedule, seq_length)
        self.micro_batch_size = micro_batch_size
        self.micro_batch_times_data_parallel_size = micro_batch_size * data_parallel_size
        self.global_batch_size = max(batch for _, batch in self.schedule)
        self.rank = rank
        if rank == 0:
            unit = f"tokens / {seq_length} per sample" if seq_length else "samples"
            logger.info("step batch size schedule (thresholds given in %s): %s", unit,
                        ", ".join(f">= {t} samples: {b}" for t, b in self.schedule))
        self.update(0, consistency_check=False)

    def batch_size_at(self, consumed_samples: int) -> int:
        """The scheduled global batch size once ``consumed_samples`` samples are consumed."""
        return [batch for threshold, batch in self.schedule if threshold <= consumed_samples][-1]

    def update(self, consumed_samples: int, consistency_check: bool, verbose: bool = False) -> None:
        current = self.batch_size_at(consumed_samples)
        changed = current != self.current_global_batch_size
        self.current_global_batch_size = current
        step = self.micro_batch_times_data_parallel_size
        if consistency_check and current % step:
            raise ValueError(
                f"--step-batch-size-schedule sets the global batch size to {current} after {consumed_samples} "
                f"consumed samples, which is not divisible by --micro-batch-size x data-parallel size = {step}; "
                "make every batch size of the schedule a multiple of it"
            )
        self.current_running_global_batch_size = current
        self.num_micro_batches = max(1, current // step)
        if verbose and changed and self.rank == 0:
            logger.info("global batch size %d after %d consumed samples: %d micro-batches",
                        current, consumed_samples, self.num_micro_batches)


def build_num_microbatches_calculator(
    rank: int,
    rampup_batch_size: Optional[Sequence[Union[int, str]]],
    global_batch_size: int,
    micro_batch_size: int,
    data_parallel_size: int,
    decrease_batch_size_if_needed: bool = False,
    step_batch_size_schedule: Optional[str] = None,
    seq_length: Optional[int] = None,
) -> NumMicroBatchesCalculator:
    """A constant calculator, a ramp-up one when ``rampup_batch_size`` is
    ``[start, increment, samples]``, or a step schedule (``step_batch_size_schedule``,
    thresholds in tokens when ``seq_length`` is given, else in samples)."""
    if step_batch_size_schedule is not None:
        if rampup_batch_size is not None or decrease_batch_size_if_needed:
            raise ValueError("--step-batch-size-schedule cannot be combined with --rampup-batch-size or "
                             "--decrease-batch-size-if-needed; keep only the schedule")
        return StepBatchsizeNumMicroBatchesCalculator(
            micro_batch_size, data_parallel_size, rank, step_batch_size_schedule, seq_length
        )
    if rampup_batch_size is None:
        return ConstantNumMicroBatchesCalculator(
            global_batch_size, micro_batch_size, data_parallel_size, decrease_batch_size_if_needed, rank
        )
    if len(rampup_batch_size) != 3:
        raise ValueError(
            f"--rampup-batch-size takes three values <start> <increment> <samples>, got {list(rampup_batch_size)!r}"
        )
    start, incr, samples = (int(v) for v in rampup_batch_size)
    return RampupBatchsizeNumMicroBatchesCalculator(
        global_batch_size, micro_batch_size, data_parallel_size, decrease_batch_size_if_needed, rank,
        start, incr, samples,
    )


def init_num_microbatches_calculator(
    rank: int,
    rampup_batch_size: Optional[List[int]],
    global_batch_size: int,
    micro_batch_size: int,
    data_parallel_size: int,
    decrease_batch_size_if_needed: bool = False,
    step_batch_size_schedule: Optional[str] = None,
    seq_length: Optional[int] = None,
) -> None:
    """Install the run's calculator; raises RuntimeError if one is installed already."""
    global _GLOBAL_NUM_MICROBATCHES_CALCULATOR
    if _GLOBAL_NUM_MICROBATCHES_CALCULATOR is not None:
        raise RuntimeError(
            "the num-microbatches calculator is already initialized: call "
            "destroy_num_microbatches_calculator() or reconfigure_num_microbatches_calculator()"
        )
    _GLOBAL_NUM_MICROBATCHES_CALCULATOR = build_num_microbatches_calculator(
        rank, rampup_batch_size, global_batch_size, micro_batch_size, data_parallel_size, decrease_batch_size_if_needed,
        step_batch_size_schedule, seq_length,
    )


def reconfigure_num_microbatches_calculator(
    rank: int,
    rampup_batch_size: Optional[List[int]],
    global_batch_size: int,
    micro_batch_size: int,
    data_parallel_size: int,
    decrease_batch_size_if_needed: bool = False,
    step_batch_size_schedule: Optional[str] = None,
    seq_length: Optional[int] = None,
) -> None:
    """Replace the installed calculator (e.g. for evaluation with other sizes)."""
    global _GLOBAL_NUM_MICROBATCHES_CALCULATOR
    _GLOBAL_NUM_MICROBATCHES_CALCULATOR = build_num_microbatches_calculator(
        rank, rampup_batch_size, global_batch_size, micro_batch_size, data_parallel_size, decrease_batch_size_if_needed,
        step_batch_size_schedule, seq_length,
    )


def destroy_num_microbatches_calculator() -> None:
    """Forget the installed calculator."""
    global _GLOBAL_NUM_MICROBATCHES_CALCULATOR
    _GLOBAL_NUM_MICROBATCHES_CALCULATOR = None


unset_num_microbatches_calculator = destroy_num_microbatches_calculator


def _calculator() -> NumMicroBatchesCalculator:
    if _GLOBAL_NUM_MICROBATCHES_CALCULATOR is None:
        raise RuntimeError("the num-microbatches calculator is not initialized: call init_num_microbatches_calculator first")
    return _GLOBAL_NUM_MICROBATCHES_CALCULATOR


def get_num_microbatches() -> int:
    """Micro-batches per global batch at the current step."""
    return _calculator().get()


def get_current_global_batch_size() -> int:
    """Global batch size at the current step (during ramp-up, the ramped value)."""
    return _calculator().get_current_global_batch_size()


def get_current_running_global_batch_size() -> int:
    """The global batch actually run (differs only with --decrease-batch-size-if-needed)."""
    return _calculator().get_current_running_global_batch_size()


def get_micro_batch_size() -> int:
    return _calculator().get_micro_batch_size()


def update_num_microbatches(consumed_samples: int, consistency_check: bool = True, verbose: bool = False) -> None:
    """Advance the ramp-up to ``consumed_samples``; with ``consistency_check``, raise
    ValueError if the new global batch is not divisible by micro-batch x dp size."""
    _calculator().update(consumed_samples, consistency_check, verbose)
