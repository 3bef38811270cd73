"""--loader core (alias mcore, megatron): a checkpoint written by a training run, in the
torch_dist or torch format, of any parallel layout."""

from __future__ import annotations

from core_checkpoint import open_core_checkpoint
from families import family
from sources import CoreSource


def add_arguments(parser) -> None:
    pass


def load_checkpoint(args, workdir: str) -> CoreSource:
    return CoreSource(open_core_checkpoint(args.load_dir), family(args.model_type))
