"""Printing from one rank, as Megatron's training scripts do."""

from __future__ import annotations

import torch.distributed as dist


def is_rank_0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def is_last_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1


def print_rank_0(message: str) -> None:
    """Print on global rank 0 only (flushes, so logs interleave correctly)."""
    if is_rank_0():
        print(message, flush=True)


def print_rank_last(message: str) -> None:
    """Print on the last global rank, which holds the loss under pipeline parallelism."""
    if is_last_rank():
        print(message, flush=True)
