"""Resharding a Megatron checkpoint by loading it into a run of the target layout and saving
it again, with the training code's own loader and saver."""

from __future__ import annotations

import os

from core_checkpoint import CoreCheckpoint, open_core_checkpoint, worker_args
from families import Family
from workers import load_and_save, run_workers

TORCH_DIST, TORCH = "torch_dist", "torch"


def save_in_layout(checkpoint: CoreCheckpoint, family: Family, save_dir: str, ckpt_format: str,
                   tp: int, pp: int, ep: int) -> None:
    """Load ``checkpoint`` on TP x PP x EP ranks and save it under ``save_dir`` (model only)."""
    args = worker_args(checkpoint.args, load=checkpoint.root, save=save_dir, ckpt_format=ckpt_format,
                       tp=tp, pp=pp, ep=ep)
    run_workers(load_and_save, tp * pp * ep, args, {"model_provider": family.model_provider})


def layout_free(checkpoint: CoreCheckpoint, family: Family, workdir: str) -> CoreCheckpoint:
    """``checkpoint`` itself when any layout can load it; for a torch-format checkpoint, a
    torch_dist copy written by a run of its own layout (the torch format loads only there)."""
    if checkpoint.ckpt_format == TORCH_DIST:
        return checkpoint
    staging = os.path.join(workdir, "layout_free")
    save_in_layout(checkpoint, family, staging, TORCH_DIST, *checkpoint.layout)
    return open_core_checkpoint(staging)
