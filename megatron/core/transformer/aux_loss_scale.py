"""The gradient scale of auxiliary losses, handed from the schedule to the layers it runs.

A layer that adds an auxiliary loss to the backward pass (the MoE router's balancing and
z-losses) must give it the scale the schedule applies to the main loss: 1 / number of
micro-batches, times the context-parallel size, or 1 with per-token loss. The schedule
knows it; the layer does not. The schedule runs each forward step inside
``auxiliary_loss_scale(scale)``; a layer reads ``current_auxiliary_loss_scale()`` during its
forward and keeps the value for its backward. The value lives only for the ``with`` block
(a ``contextvars`` variable, so threads do not share it); outside any schedule it is None,
and the layer falls back to its own default.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional

_SCALE: contextvars.ContextVar[Optional[float]] = contextvars.ContextVar("auxiliary_loss_scale", default=None)


def main_loss_scale(per_token_loss: bool, cp_size: int, num_microbatches: int) -> float:
    """The factor the schedule multiplies each micro-batch's loss by before backward."""
    return 1.0 if per_token_loss else cp_size / num_microbatches


@contextlib.contextmanager
def auxiliary_loss_scale(scale: float) -> Iterator[None]:
    """Within the block, auxiliary losses enter the backward pass with gradient ``scale``."""
    token = _SCALE.set(float(scale))
    try:
        yield
    finally:
        _SCALE.reset(token)


def current_auxiliary_loss_scale() -> Optional[float]:
    """The scale set by the innermost ``auxiliary_loss_scale`` block; None outside one."""
    return _SCALE.get()
