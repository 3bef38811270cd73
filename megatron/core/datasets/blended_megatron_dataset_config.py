"""Configuration shared by every dataset the blended builder makes (Megatron-Core names)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from megatron.core.datasets.blend_spec import Blend, get_blend_from_list
from megatron.core.datasets.split import (
    Split,
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)

logger = logging.getLogger(__name__)

__all__ = [
    "BlendedMegatronDatasetConfig",
    "convert_split_vector_to_split_matrix",
    "get_blend_from_list",
    "parse_and_normalize_split",
]


def _check_blend(blend: Blend, flag: str) -> None:
    prefixes, weights = blend
    if not prefixes:
        raise ValueError(f"{flag} names no dataset; give at least one path prefix")
    if weights is not None and len(weights) != len(prefixes):
        raise ValueError(
            f"{flag} has {len(prefixes)} prefixes but {len(weights)} weights; give one weight per prefix"
        )


@dataclass
class BlendedMegatronDatasetConfig:
    """Where the data comes from, how it is split and cached.

    With neither ``blend`` nor ``blend_per_split`` the config is a mock one: ``mock`` becomes
    True and ``split`` becomes ``"1,1,1"``.
    """

    random_seed: int
    """Seed of every shuffle (--seed)."""

    sequence_length: int
    """Tokens per sample, excluding the extra label token (--seq-length)."""

    blend: Optional[Blend] = None
    """(prefixes, weights or None) shared by all splits (--data-path)."""

    blend_per_split: Optional[List[Optional[Blend]]] = None
    """One blend (or None) per split (--train-data-path, --valid-data-path, --test-data-path)."""

    split: Optional[str] = None
    """Train/valid/test proportions of ``blend`` (--split)."""

    split_matrix: Optional[List[Optional[Tuple[float, float]]]] = field(init=False, default=None)
    """Bookends of each split, derived from ``split``."""

    num_dataset_builder_threads: int = 1
    """Threads that build per-prefix datasets (--num-dataset-builder-threads)."""

    path_to_cache: Optional[str] = None
    """Directory for index caches (--data-cache-path)."""

    mmap_bin_files: bool = True
    """Memory-map the .bin files (off with --no-mmap-bin-files)."""

    mock: bool = field(init=False, default=False)
    """True when no blend is given: synthetic data."""

    tokenizer: Optional[object] = None
    """Tokenizer with ``eod``, ``pad`` and ``unique_identifiers``."""

    mid_level_dataset_surplus: float = 0.005
    """Extra fraction of samples requested from each blended dataset (--mid-level-dataset-surplus)."""

    multiple_validation_sets: bool = False
    """Build each prefix of the validation blend as a dataset of its own, evaluated separately,
    instead of blending them (--multiple-validation-sets; needs a per-split validation blend)."""

    full_validation: bool = False
    """Validation datasets are asked for one epoch each (--full-validation)."""

    def __post_init__(self) -> None:
        if self.multiple_validation_sets and (self.blend_per_split is None or self.blend_per_split[1] is None):
            raise ValueError(
                "--multiple-validation-sets evaluates each validation prefix on its own, so the validation "
                "prefixes must be named separately: give --valid-data-path P1 P2 ... (with --train-data-path), "
                "or a \"valid\" entry in --per-split-data-args-path"
            )
        if self.blend_per_split is not None and any(b is not None for b in self.blend_per_split):
            if self.blend is not None:
                raise ValueError("--data-path cannot be combined with per-split paths; give one or the other")
            if self.split is not None:
                raise ValueError(
                    f"--split {self.split!r} cannot be combined with per-split data paths: each split "
                    "has its own data; drop --split"
                )
            if len(self.blend_per_split) != len(Split):
                raise ValueError(f"blend_per_split needs {len(Split)} entries (train, valid, test)")
            for split, blend in zip(Split, self.blend_per_split):
                if blend is None:
                    logger.info("no blend given for the %s split", split.name)
                else:
                    _check_blend(blend, f"--{split.name}-data-path")
            return
        if self.blend is not None:
            _check_blend(self.blend, "--data-path")
            if self.split is None:
                raise ValueError("--split is needed with --data-path, e.g. --split 969,30,1")
        else:
            self.mock = True
            self.split = "1,1,1"
            logger.info("no blend given: mock data with split %s", self.split)
        self.split_matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(self.split))
