"""Printing from one rank, as Megatron's training scripts do.

A process on torch's fake backend (``--fake-process-group``) is the only one of its job and
prints what rank 0 and the last rank print, whatever rank it plays."""

from __future__ import annotations

import torch.distributed as dist

from megatron.core.fake_backend import is_fake


def is_rank_0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0 or is_fake()


def is_last_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1 or is_fake()


def print_rank_0(message: str) -> None:
    """Print on global rank 0 only (flushes, so logs interleave correctly)."""
    if is_rank_0():
        print(message, flush=True)


def print_rank_last(message: str) -> None:
    """Print on the last global rank, which holds the loss under pipeline parallelism."""
    if is_last_rank():
        print(message, flush=True)
