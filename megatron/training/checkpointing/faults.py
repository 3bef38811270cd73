"""Crash points inside a checkpoint save, for testing crash safety.

Set ``MEGATRON_CKPT_CRASH=<phase>:<rank>`` (optionally ``:<iteration>``) and that rank
kills itself with SIGKILL at the named phase of the save: ``before_shards`` (staging
directory made, nothing written), ``mid_shard`` (part of its data file written),
``after_shards`` (all data written and fsynced, not committed), ``after_commit``
(directory renamed, tracker not yet updated). Unset, these are no-ops.

``crash_point`` is the default ``fault_hook`` of ``save_checkpoint``; a test passes its
own hook (same signature, ``FaultHook``) to fail a save in another way at these points.
"""

from __future__ import annotations

import os
import signal
from typing import Callable, Optional

ENV_VAR = "MEGATRON_CKPT_CRASH"
PHASES = ("before_shards", "mid_shard", "after_shards", "after_commit")

# hook(phase, rank, iteration), called by every rank at each phase of every save.
FaultHook = Callable[[str, int, int], None]


def _requested() -> Optional[tuple]:
    spec = os.environ.get(ENV_VAR)
    if not spec:
        return None
    parts = spec.split(":")
    if parts[0] not in PHASES or len(parts) not in (2, 3):
        raise ValueError(f"{ENV_VAR}={spec!r}: expected <phase>:<rank>[:<iteration>] with phase one of {PHASES}")
    return parts[0], int(parts[1]), int(parts[2]) if len(parts) == 3 else None


def crash_point(phase: str, rank: int, iteration: int) -> None:
    """SIGKILL this process when MEGATRON_CKPT_CRASH names this phase, rank and iteration."""
    requested = _requested()
    if requested is None:
        return
    want_phase, want_rank, want_iteration = requested
    if phase == want_phase and rank == want_rank and want_iteration in (None, iteration):
        os.kill(os.getpid(), signal.SIGKILL)
