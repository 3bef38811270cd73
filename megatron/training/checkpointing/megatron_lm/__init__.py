"""Checkpoints in Megatron-LM's own layout: load them (both formats, any parallel layout)
and write them (``--ckpt-megatron-lm-layout``), so users can come and go back.

The checkpointing entry points (``checkpointing.api``) ask ``is_megatron_checkpoint``
before their own formats and hand such directories to ``load``; with the flag set they
save through ``torch_dist.build_save_items`` / ``legacy.build_payload``. Nothing pickled
in a Megatron-LM checkpoint is unpickled with code execution (``pickles``).
"""

from __future__ import annotations

import argparse
import logging
from typing import Callable, List

from megatron.core.process_groups import ProcessGroups
from megatron.training.checkpointing.megatron_lm import legacy, run_args, torch_dist

logger = logging.getLogger(__name__)

def is_megatron_checkpoint(directory: str) -> bool:
    """Whether ``directory`` (an ``iter_*`` directory) was written in Megatron-LM's layout."""
    return torch_dist.is_megatron_torch_dist(directory) or legacy.is_megatron_legacy(directory)


def read_saved_args(directory: str) -> argparse.Namespace:
    """The saving run's args, as plain values our code reads (``run_args.from_megatron``)."""
    if torch_dist.is_megatron_torch_dist(directory):
        saved = torch_dist.read_common(directory).get("args")
    else:
        saved = legacy.read_args(directory)
    return run_args.from_megatron(saved) if saved is not None else None


def load(directory: str, model, groups: ProcessGroups, args, gather_problems: Callable[[str], List[str]],
         group) -> dict:
    """Load the model weights of a Megatron-LM checkpoint into this rank's chunks; returns
    its common state (``args`` as plain values, ``iteration``, FLOPs so far). Optimizer and
    RNG states of Megatron-LM are not read: training continues with a fresh optimizer."""
    if torch_dist.is_megatron_torch_dist(directory):
        common = torch_dist.load(directory, model, groups, args, gather_problems, group)
    else:
        common = legacy.load(directory, model, groups, gather_problems)
    common = dict(common)
    if common.get("args") is not None:
        common["args"] = run_args.from_megatron(common["args"])
    return common


__all__ = ["is_megatron_checkpoint", "legacy", "load", "read_saved_args", "run_args", "torch_dist"]
