"""Megatron's rank roles for serving: the first rank of the model (pipeline stage 0,
tensor-parallel rank 0) runs the HTTP server; every other rank loops on a broadcast of a
long from it: 0 = run a batch (the engine method, the requests and the method's options
follow, as a pickled object), 1 = exit. All ranks then run that engine method on the same
batch together: ``generate`` of a generation engine, ``score`` or ``embed`` of an encoder
engine.
"""

from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

GENERATE, EXIT = 0, 1


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _broadcast_command(command: int) -> int:
    value = torch.tensor([command], dtype=torch.long, device=_device())
    dist.broadcast(value, 0)
    return int(value.item())


class Leader:
    """Rank 0's side: tell the followers what to run, and when to stop."""

    def announce(self, requests, method: str = "generate", **options) -> None:
        """Have every follower call ``engine.<method>(requests, **options)``."""
        _broadcast_command(GENERATE)
        dist.broadcast_object_list([(method, list(requests), options)], 0, device=_device())

    def shutdown(self) -> None:
        _broadcast_command(EXIT)


def ignore_stop_signals() -> None:
    """From now on ignore SIGINT and SIGTERM in this process. torchrun (and a terminal's
    Ctrl-C) signal every rank, and torchrun signals again while they wind down; the
    followers leave stopping to rank 0, which stops serving, broadcasts exit and then shuts
    down with them, so no rank dies inside a collective the others wait on."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def follow(engine) -> None:
    """Every rank but 0: run each batch rank 0 announces until it says exit."""
    ignore_stop_signals()
    _follow(engine)


def _follow(engine) -> None:
    while True:
        command = _broadcast_command(GENERATE)
        if command == EXIT:
            logger.info("text generation follower: exit received")
            return
        box = [None]
        dist.broadcast_object_list(box, 0, device=_device())
        method, requests, options = box[0]
        getattr(engine, method)(requests, **options)
