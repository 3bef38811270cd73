"""Delayed scaling under activation recompute: the recomputed forward quantizes as the first did.

Under ``delayed`` each forward quantization (an input or a weight) uses the state's scale and
then moves the state on: its amax enters the history and the next scale is derived. Full
recompute runs every checkpointed forward twice. The second run must quantize with the
scales the first one used, or the recomputed activations (and so the gradients) would not
belong to the activations the next layers consumed; and it must not record its amaxes a
second time. Between the two runs other micro-batches may move the same states on (the
pipeline schedules run later forwards before earlier backwards). Transformer Engine keeps
a copy of its FP8 metadata per checkpointed forward for the same reason.

``CheckpointFunction`` (``tensor_parallel.random``) opens ``recording()`` around the first
forward and ``replaying(record)`` around the recompute. While a recording is open, each
forward quantization under ``delayed`` notes the scale it uses; while a replay is open, the
same quantizations, met in the same order, take those scales back and leave their states
as they are. Output-gradient quantizations run in the backward, outside both. A forward
that does not run under ``delayed`` records nothing.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Tuple

import torch


class Record:
    """The scales the forward quantizations of one checkpointed forward used, in order."""

    def __init__(self) -> None:
        self.entries: List[Tuple[object, int, torch.Tensor]] = []
        self.position = 0

    def note(self, owner, slot: int, scale: torch.Tensor) -> None:
        self.entries.append((owner, slot, scale))

    def take(self, owner, slot: int) -> torch.Tensor:
        if self.position >= len(self.entries):
            raise RuntimeError("the recomputed forward quantized more FP8 operands than the first forward did; "
                               "a checkpointed function must run the same FP8 linears each time")
        noted_owner, noted_slot, scale = self.entries[self.position]
        if noted_owner is not owner or noted_slot != slot:
            raise RuntimeError("the recomputed forward quantized its FP8 operands in another order than the "
                               "first forward did; a checkpointed function must run the same FP8 linears each time")
        self.position += 1
        return scale


_recording: List[Record] = []
_replaying: List[Record] = []


def recording_now() -> Optional[Record]:
    """The record a forward quantization notes its scale in, if a first forward is running."""
    return _recording[-1] if _recording and not _replaying else None


def replaying_now() -> Optional[Record]:
    """The record a recomputed forward takes its scales from, if one is running."""
    return _replaying[-1] if _replaying else None


@contextlib.contextmanager
def recording() -> Iterator[Record]:
    record = Record()
    _recording.append(record)
    try:
        yield record
    finally:
        _recording.pop()


@contextlib.contextmanager
def replaying(record: Optional[Record]) -> Iterator[None]:
    if record is None:
        yield
        return
    record.position = 0
    _replaying.append(record)
    try:
        yield
    finally:
        _replaying.pop()
