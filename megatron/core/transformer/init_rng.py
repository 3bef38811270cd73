"""Weight initialization that does not depend on the parallel layout.

Each pipeline stage seeds its generators with seed + 100 * pp_rank (as Megatron does),
so a layer drawn from the running CPU generator would get different weights on
different pipeline layouts. Inside ``layout_independent_initialization(seed)``, every
``initialization_stream(key)`` block instead draws from the CPU generator freshly seeded
from ``(seed, key)``; the model opens one block per piece (``"embedding"``,
``"layer<global number>"``, ``"output_layer"``). With ``--use-cpu-initialization`` (full
weights drawn on the CPU, then sharded) a model therefore gets the same weights for every
tensor-, pipeline- and virtual-pipeline layout. Outside the context the blocks do nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator, Optional

import torch

_INIT_SEED: Optional[int] = None


def stream_seed(seed: int, key: str) -> int:
    """A 63-bit seed that depends only on ``seed`` and ``key``."""
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@contextlib.contextmanager
def layout_independent_initialization(seed: Optional[int]) -> Iterator[None]:
    """Make ``initialization_stream`` blocks seed from ``seed`` (None: leave them inactive)."""
    global _INIT_SEED
    previous, _INIT_SEED = _INIT_SEED, seed
    try:
        yield
    finally:
        _INIT_SEED = previous


@contextlib.contextmanager
def initialization_stream(key: str) -> Iterator[None]:
    """Draw from the CPU generator seeded by (seed, ``key``), restoring it afterwards."""
    if _INIT_SEED is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(_INIT_SEED, key))
        yield
