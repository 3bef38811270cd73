"""Try loading checkpoints into a live 2-rank tiny GPT and report, per checkpoint, the
error raised and whether the model and optimizer are exactly as before the attempt."""

from __future__ import annotations

import contextlib
import io
import sys
from typing import List, Optional, Tuple

import torch

from tests.multirank import run_on_ranks
from tests.training.gpt_runs import TINY_GPT


class _Done(Exception):
    """Stops pretrain once the load attempts are made."""


def _snapshot(model, optimizer) -> List[torch.Tensor]:
    tensors = [p.detach().clone() for chunk in model for p in chunk.parameters()]
    inner = optimizer.optimizer
    tensors += [p.detach().clone() for group in inner.param_groups for p in group["params"]]
    tensors += [v.detach().clone() for state in inner.state.values() for v in state.values()
                if isinstance(v, torch.Tensor)]
    return tensors


def _unchanged(before: List[torch.Tensor], after: List[torch.Tensor]) -> bool:
    return len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after))


def _attempt_loads(rank, world_size, argv, roots, bare=()) -> List[Tuple[Optional[str], bool]]:
    import pretrain_gpt
    from megatron.core.transformer.enums import ModelType
    from megatron.training import model_setup, training

    original = model_setup.load_checkpoint
    outcomes = []

    def attempts(model, optimizer, scheduler, args, pg, **kwargs):
        for index, root in enumerate(roots):
            args.load = root
            before = _snapshot(model, optimizer)
            iteration = None
            try:
                if index in bare:  # Megatron's evaluation pattern: load_checkpoint(model, None, None)
                    iteration, _ = original(model, None, None, args, pg, **kwargs)
                else:
                    iteration, _ = original(model, optimizer, scheduler, args, pg, **kwargs)
                error = None
            except Exception as caught:  # noqa: BLE001 -- the tests read the message
                error = f"{type(caught).__name__}: {caught}"
            outcomes.append((error, _unchanged(before, _snapshot(model, optimizer)), iteration))
        raise _Done()

    model_setup.load_checkpoint = attempts
    sys.argv = ["pretrain_gpt.py"] + list(argv)
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            training.pretrain(pretrain_gpt.train_valid_test_datasets_provider, pretrain_gpt.model_provider,
                              ModelType.encoder_or_decoder, pretrain_gpt.forward_step)
        except _Done:
            pass
    return outcomes


def try_loads(roots: List[str], extra: List[str]) -> List[Tuple[Optional[str], bool]]:
    """Per root: (the error of loading it, or None; whether nothing changed). ``extra``
    flags override the tiny model (another --hidden-size, say). Rank 0's view."""
    argv = TINY_GPT + ["--train-iters", "3", "--load", roots[0]] + list(extra)
    per_rank = run_on_ranks(_attempt_loads, 2, args=(argv, list(roots)), timeout=300)
    return [(error, all(r[i][1] for r in per_rank)) for i, (error, _, _) in enumerate(per_rank[0])]


def loaded_iterations(roots: List[str], extra: List[str], bare=()) -> List[Tuple[Optional[str], Optional[int]]]:
    """Per root: (the error of loading it, or None; the iteration loaded). Rank 0's view.
    Roots whose index is in ``bare`` are loaded without optimizer and scheduler."""
    argv = TINY_GPT + ["--train-iters", "3", "--load", roots[0]] + list(extra)
    per_rank = run_on_ranks(_attempt_loads, 2, args=(argv, list(roots), tuple(bare)), timeout=300)
    return [(error, iteration) for error, _, iteration in per_rank[0]]
