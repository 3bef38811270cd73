"""Local worker processes that load and save checkpoints with the training code itself.

Each worker is one rank of a gloo "run" (launched the way torchrun would: MASTER_ADDR,
MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK), calls ``initialize_megatron`` with a complete
argument namespace, builds its model chunks with the family's model provider and then
loads / saves through ``megatron.training.checkpointing``. Sharding, resharding and the
file formats therefore stay the training code's business. Workers print only errors.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import socket
from typing import Callable

import torch
import torch.multiprocessing as mp


class ConversionError(RuntimeError):
    """A conversion that cannot go on; the message says why and what to do."""


class NoOptimizer:
    """Stands in for the optimizer: conversion keeps no optimizer state, so none is built
    (that saves the fp32 copies of every weight)."""

    def reload_model_params(self) -> None:
        pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _resolve(path: str) -> Callable:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _entry(rank: int, world_size: int, port: int, task: Callable, args, payload) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    # One thread: the forked worker must not enter OpenMP's thread pool, which does not survive
    # fork. Once the parent has run a parallel region (the import maps real-size weights), the
    # child's first parallel op (a 30522-row embedding shard) would wait forever on it.
    torch.set_num_threads(1)
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        from megatron.training.initialize import initialize_megatron

        args.rank, args.world_size = rank, world_size
        initialize_megatron(parsed_args=args)
        logging.getLogger("megatron").setLevel(logging.WARNING)
        try:
            task(args, payload)
        finally:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()
                dist.destroy_process_group()


def _preload(payload: dict) -> None:
    """Import the training code once here: forked workers then start without re-importing it."""
    import megatron.training.checkpointing  # noqa: F401
    import megatron.training.initialize  # noqa: F401
    import megatron.training.model_setup  # noqa: F401

    _resolve(payload["model_provider"])


def run_workers(task: Callable, world_size: int, args, payload: dict) -> None:
    """Run ``task(args, payload)`` on ``world_size`` local ranks (forked, so that they share
    the imported modules); raise ConversionError with the failing rank's error."""
    _preload(payload)
    try:
        mp.start_processes(_entry, args=(world_size, _free_port(), task, args, payload), nprocs=world_size,
                           join=True, start_method="fork")
    except mp.ProcessRaisedException as error:
        lines = [line for line in str(error).strip().splitlines() if line.strip()]
        raise ConversionError(f"a conversion worker failed: {lines[-1] if lines else error}\n{error}") from None
    except mp.ProcessExitedException as error:
        raise ConversionError(f"a conversion worker died: {error}") from None


def _model(payload: dict) -> list:
    from megatron.core import parallel_state
    from megatron.training.model_setup import get_model

    provider = _resolve(payload["model_provider"])
    return get_model(provider, parallel_state.get_process_groups(), wrap_with_ddp=False)


def load_and_save(args, payload) -> None:
    """Load ``args.load`` into this rank's chunks and save them under ``args.save``."""
    from megatron.core import parallel_state
    from megatron.training.checkpointing import load_checkpoint, save_checkpoint

    model = _model(payload)
    groups = parallel_state.get_process_groups()
    iteration, flops = load_checkpoint(model, NoOptimizer(), None, args, groups)
    save_checkpoint(iteration, model, None, None, flops, args=args, pg=groups)


def import_state_dict(args, payload) -> None:
    """One rank: load the converted state dict (file ``payload["state_dict"]``) strictly and
    save it at iteration 0."""
    from megatron.core import parallel_state
    from megatron.training.checkpointing import save_checkpoint

    model = _model(payload)
    state_dict = torch.load(payload["state_dict"], map_location="cpu", weights_only=True)
    model[0].load_state_dict(state_dict, strict=True)
    save_checkpoint(0, model, None, None, 0.0, args=args, pg=parallel_state.get_process_groups())


def export_state_dict(args, payload) -> None:
    """One rank: load ``args.load`` into a single-rank model and write its state dict,
    iteration and tokenizer vocabulary size to the file ``payload["output"]``."""
    from megatron.core import parallel_state
    from megatron.training.checkpointing import load_checkpoint
    from megatron.training.global_vars import get_tokenizer

    model = _model(payload)
    iteration, _ = load_checkpoint(model, NoOptimizer(), None, args, parallel_state.get_process_groups())
    state = {k: v for k, v in model[0].state_dict().items() if not k.endswith("_extra_state")}
    torch.save({"model": state, "iteration": iteration, "vocab_size": get_tokenizer().vocab_size},
               payload["output"])
