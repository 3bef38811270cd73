"""The counters of a training run, owned by the training loop.

``RunState`` is the one place where the loop keeps how far the run has come: the iteration,
the samples consumed from the training and validation sets, the floating-point operations so
far, the last saved iteration and the counts of skipped and NaN iterations. The loop passes it
explicitly to whatever reads or advances those counters (checkpoint save and load, the data
iterators, evaluation, the logs); nothing else keeps its own copy.

Megatron's scripts read some of these counters from the argument namespace
(``args.iteration``, ``args.consumed_train_samples``, ...). ``publish`` copies them there, for
those readers only: after argument validation (all zero), after a checkpoint is loaded, and
when training ends. The copy on ``args`` is read-only compatibility; writing to it changes
nothing in the run. A checkpoint stores the namespace with the counters of the moment
(``stamped_args``), as Megatron's checkpoints do, so that both ours and Megatron's tools find
them in the saved ``args``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Optional

# RunState field -> the ``args`` attribute Megatron's scripts and checkpoints use for it.
# last_saved_iteration and the skipped/NaN iteration counts are this loop's own and are not
# published.
_PUBLISHED = {
    "iteration": "iteration",
    "consumed_train_samples": "consumed_train_samples",
    "consumed_valid_samples": "consumed_valid_samples",
    "skipped_train_samples": "skipped_train_samples",
    "floating_point_operations_so_far": "num_floating_point_operations_so_far",
}

# The counters a checkpoint carries in its saved ``args`` (Megatron's names); a checkpoint's
# iteration and FLOPs have their own top-level keys.
CHECKPOINTED_SAMPLE_COUNTERS = ("consumed_train_samples", "consumed_valid_samples", "skipped_train_samples")


@dataclass
class RunState:
    """How far the run has come. Only the training loop (and checkpoint loading, on its
    behalf) advances these counters.

    ``skipped_train_samples`` counts the samples of --iterations-to-skip iterations (read and
    dropped); ``skipped_iterations`` counts optimizer steps that did not apply (fp16
    overflow); ``nan_iterations`` counts iterations whose loss or gradient norm was not
    finite. The last three start at zero for each job.
    """

    iteration: int = 0
    consumed_train_samples: int = 0
    consumed_valid_samples: int = 0
    skipped_train_samples: int = 0
    floating_point_operations_so_far: float = 0.0
    last_saved_iteration: Optional[int] = None
    skipped_iterations: int = 0
    nan_iterations: int = 0

    def publish(self, args: argparse.Namespace) -> None:
        """Copy the counters Megatron's scripts read onto ``args`` (read-only compatibility)."""
        for name, attribute in _PUBLISHED.items():
            setattr(args, attribute, getattr(self, name))

    def stamped_args(self, args: argparse.Namespace) -> argparse.Namespace:
        """A copy of ``args`` carrying the current counters, for a checkpoint to store;
        ``args`` itself is left as it is."""
        copy = argparse.Namespace(**vars(args))
        self.publish(copy)
        return copy

    def restore_sample_counters(self, counters: dict) -> None:
        """Take the sample counters a checkpoint carried (``CHECKPOINTED_SAMPLE_COUNTERS``)."""
        for name in CHECKPOINTED_SAMPLE_COUNTERS:
            setattr(self, name, int(counters.get(name, 0)))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "RunState":
        """The counters found on ``args`` (zero where absent): for callers outside the training
        loop that still keep them there, such as Megatron-style scripts and tools."""
        state = cls()
        for name, attribute in _PUBLISHED.items():
            value = getattr(args, attribute, None)
            if value is not None:
                setattr(state, name, type(getattr(state, name))(value))
        return state
