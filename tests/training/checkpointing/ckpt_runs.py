"""In-process tiny-GPT runs on N gloo ranks that capture what checkpoint tests compare:
the exact reduced loss of every iteration, and (optionally) the full, layout-independent
model params and optimizer model-space state at chosen points of the run.

    run = run_ckpt(2, ["--tensor-model-parallel-size", "2"], iters=6, snapshots=("load", 3))
    run.losses            # {iteration: float.hex of the reduced "lm loss"}
    run.snapshots["load"] # {global key: full tensor}, right after setup (and any --load)
    run.snapshots[3]      # the same, right after the optimizer step of iteration 3

A snapshot's keys are the checkpoint's own global keys (``model_sharding``): the model
tensors under their names and ``optimizer.state.<state>.<name>`` for the optimizer state,
each assembled from the tensor-parallel pieces of every rank, so snapshots taken under
different parallel layouts compare directly.
"""

from __future__ import annotations

import contextlib
import io
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple, Union

import torch

from tests.multirank import run_on_ranks
from tests.training.gpt_runs import TINY_GPT

SnapshotPoint = Union[str, int]  # "load" or an iteration number

DROPOUT = ["--hidden-dropout", "0.1", "--attention-dropout", "0.1"]


@dataclass
class CkptRun:
    losses: Dict[int, str] = field(default_factory=dict)
    snapshots: Dict[SnapshotPoint, Dict[str, torch.Tensor]] = field(default_factory=dict)
    log: str = ""  # the last rank's output (it logs the losses)
    rank0_log: str = ""  # rank 0's (print_rank_0's lines)

    def loss_floats(self) -> Dict[int, float]:
        return {it: float.fromhex(h) for it, h in self.losses.items()}


# A rank's view of one snapshot: (key, global shape, partition dim, pieces, local tensor).
_Piece = Tuple[str, Tuple[int, ...], int, Tuple[Tuple[int, int, int], ...], torch.Tensor]


def _local_pieces(model, optimizer) -> List[_Piece]:
    """This rank's tensors and their placements; collective (the distributed optimizer
    gathers its shards over data-parallel ranks)."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.model_sharding import model_placements
    from megatron.core.optimizer.param_state import model_space_state

    for chunk in model:
        if hasattr(chunk, "finish_param_sync"):
            chunk.finish_param_sync()
    placements = model_placements(model, parallel_state.get_process_groups())
    states, _ = model_space_state(optimizer)
    out: List[_Piece] = []
    for tensor, placement in placements:
        entries = [(placement.key, tensor)]
        entries += [(f"optimizer.state.{name}.{placement.key}", value)
                    for name, value in states.get(tensor, {}).items()]
        for key, value in entries:
            out.append((key, placement.global_shape, placement.dim, placement.pieces,
                        value.detach().float().cpu().clone()))
    return out


def _assemble(per_rank: Sequence[List[_Piece]]) -> Dict[str, torch.Tensor]:
    """Full tensors from every rank's pieces; replicas (data-parallel) must agree exactly."""
    full: Dict[str, torch.Tensor] = {}
    for pieces in per_rank:
        for key, global_shape, dim, spans, local in pieces:
            target = full.setdefault(key, torch.full(global_shape, float("nan")))
            for start, length, offset in spans:
                src = local if len(spans) == 1 else local.narrow(dim, start, length)
                dst = target if not target.dim() else target.narrow(dim, offset, src.shape[dim] if src.dim() else 1)
                written = ~torch.isnan(dst)
                if written.any() and not torch.equal(dst[written], src[written]):
                    raise AssertionError(f"{key}: replicas on different ranks disagree")
                dst.copy_(src)
    for key, tensor in full.items():
        if torch.isnan(tensor).any():
            raise AssertionError(f"{key}: no rank holds part of it")
    return full


def _run_pretrain(rank, world_size, argv, snapshot_points):
    import pretrain_gpt
    from megatron.core.transformer.enums import ModelType
    from megatron.training import training

    captured: dict = {"losses": {}, "snapshots": {}}
    original_setup, original_step = training.setup_model_and_optimizer, training.train_step

    def setup(*args, **kwargs):
        model, optimizer, scheduler = original_setup(*args, **kwargs)
        captured["model"], captured["optimizer"] = model, optimizer
        if "load" in snapshot_points:
            captured["snapshots"]["load"] = _local_pieces(model, optimizer)
        return model, optimizer, scheduler

    def step(*args, **kwargs):
        result = original_step(*args, **kwargs)
        iteration = args[-1] if len(args) >= 7 else kwargs["iteration"]
        if "lm loss" in result.losses:
            captured["losses"][iteration] = float(result.losses["lm loss"]).hex()
        if iteration in snapshot_points:
            captured["snapshots"][iteration] = _local_pieces(captured["model"], captured["optimizer"])
        return result

    training.setup_model_and_optimizer, training.train_step = setup, step
    sys.argv = ["pretrain_gpt.py"] + list(argv)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        training.pretrain(pretrain_gpt.train_valid_test_datasets_provider, pretrain_gpt.model_provider,
                          ModelType.encoder_or_decoder, pretrain_gpt.forward_step)
    return captured["losses"], captured["snapshots"], out.getvalue()


def run_ckpt(world_size: int, extra: List[str], iters: int, snapshots: Sequence[SnapshotPoint] = (),
             base: Sequence[str] = TINY_GPT) -> CkptRun:
    """A tiny-GPT run of ``iters`` iterations (counted from 0, also after --load)."""
    argv = list(base) + ["--train-iters", str(iters)] + list(extra)
    results = run_on_ranks(_run_pretrain, world_size, args=(argv, tuple(snapshots)), timeout=300)
    run = CkptRun(losses=results[-1][0], log=results[-1][2], rank0_log=results[0][2])
    for point in snapshots:
        run.snapshots[point] = _assemble([r[1][point] for r in results])
    return run


def assert_same_tensors(expected: Dict[str, torch.Tensor], actual: Dict[str, torch.Tensor],
                        prefix: str = "") -> None:
    """Bitwise equality of every tensor whose key starts with ``prefix``; tensors whose
    leading dim differs (padded vocabularies) are compared on their common rows."""
    keys = sorted(k for k in expected if k.startswith(prefix))
    assert keys, f"no tensors under {prefix!r}"
    assert keys == sorted(k for k in actual if k.startswith(prefix))
    for key in keys:
        a, b = expected[key], actual[key]
        if a.shape != b.shape:
            rows = min(a.shape[0], b.shape[0])
            a, b = a[:rows], b[:rows]
        assert torch.equal(a, b), f"{key}: max difference {(a - b).abs().max().item()}"
