"""Builds the train/valid/test datasets of a config: splits, per-prefix datasets, blends.

Distributed behaviour (as Megatron's): ``build()`` must be called on every rank. Global
rank 0 builds first (writing the index caches) while the others wait at a barrier, then
the other ranks for which ``is_built_on_rank()`` is True build, loading those caches.
Ranks where it is False get None.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, List, Optional, Sequence, Type

import torch

from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_config import BlendedMegatronDatasetConfig
from megatron.core.datasets.megatron_dataset import MegatronDataset
from megatron.core.datasets.split import Split, normalize, split_element_range

logger = logging.getLogger(__name__)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _barrier() -> None:
    """Wait for every rank of the default group (no data moves)."""
    torch.distributed.barrier()


def get_size_per_split_per_dataset(normalized_weights: Sequence[float], target_size_per_split: Sequence[Optional[int]],
                                   surplus: float = 0.0) -> List[List[Optional[int]]]:
    """Samples to request from each dataset for each split: ``ceil(ceil(size * w) * (1 + surplus))``."""
    return [
        [None if size is None else int(math.ceil(math.ceil(size * w) * (1 + surplus))) for size in target_size_per_split]
        for w in normalized_weights
    ]


def _blend_present(datasets, weights, size, config) -> Optional[BlendedDataset]:
    """A BlendedDataset of the datasets that exist (a prefix whose split came out empty has
    None); None when there are none."""
    kept = [(d, w) for d, w in zip(datasets, weights) if d is not None]
    if not kept:
        return None
    if len(kept) < len(datasets):
        logger.warning("%d of %d blended datasets have an empty split; blending the rest",
                       len(datasets) - len(kept), len(datasets))
    return BlendedDataset([d for d, _ in kept], [w for _, w in kept], size, config)


class BlendedMegatronDatasetBuilder:
    """``BlendedMegatronDatasetBuilder(cls, sizes, is_built_on_rank, config).build()``.

    ``cls`` is a MegatronDataset subclass (GPTDataset, MockGPTDataset); ``sizes`` the
    samples wanted per split (None: one epoch); ``is_built_on_rank`` a no-argument callable.
    """

    def __init__(self, cls: Type[MegatronDataset], sizes: Sequence[Optional[int]], is_built_on_rank: Callable[[], bool],
                 config: BlendedMegatronDatasetConfig) -> None:
        if len(sizes) != len(Split):
            raise ValueError(f"sizes needs one entry per split (train, valid, test), got {list(sizes)}")
        self.cls = cls
        self.sizes = list(sizes)
        self.is_built_on_rank = is_built_on_rank
        self.config = config
        for split in Split:
            blend = self._blend_of(split)
            if blend is not None and self.sizes[split.value] is None and blend[1] is not None \
                    and not self._separate_validation_sets(split):
                raise ValueError(
                    f"the {split.name} blend has weights but no requested size; weighted blends need a "
                    "sample count (use an unweighted list, or set --train-iters/--eval-iters; "
                    "--full-validation reads one epoch of each validation prefix, so give those without weights)"
                )

    def _blend_of(self, split: Split):
        if self.config.mock:
            return None
        if self.config.blend_per_split is not None and any(b is not None for b in self.config.blend_per_split):
            return self.config.blend_per_split[split.value]
        return self.config.blend

    def _separate_validation_sets(self, split: Split) -> bool:
        """True when the validation prefixes are built one by one (multiple_validation_sets)."""
        return split == Split.valid and self.config.multiple_validation_sets

    def build(self) -> List[Optional[Any]]:
        """One dataset (or None) per split: a BlendedDataset, a mid-level dataset or None.
        With ``multiple_validation_sets`` and several validation prefixes, the validation entry
        is a list of one mid-level dataset per prefix (weights, if any, are not used).

        A split asked for 0 samples is not built (None), like a split with an empty range.
        """
        if self.config.blend_per_split is not None and any(b is not None for b in self.config.blend_per_split):
            return self._build_per_split()
        matrix = [None if size == 0 else bookend for bookend, size in zip(self.config.split_matrix, self.sizes)]
        if self.config.mock:
            return self._build_megatron_dataset_splits(None, matrix, self.sizes)
        return self._build_blend(self.config.blend, matrix, self.sizes)

    def _build_per_split(self) -> List[Optional[Any]]:
        out: List[Optional[Any]] = [None] * len(Split)
        for split in Split:
            blend = self.config.blend_per_split[split.value]
            if blend is None or self.sizes[split.value] == 0:
                continue
            matrix: List[Optional[tuple]] = [None] * len(Split)
            matrix[split.value] = (0.0, 1.0)
            sizes = [0] * len(Split)
            sizes[split.value] = self.sizes[split.value]
            if len(blend[0]) > 1 and self._separate_validation_sets(split):
                out[split.value] = [self._build_megatron_dataset_splits(prefix, matrix, sizes)[split.value]
                                    for prefix in blend[0]]
            elif len(blend[0]) == 1:
                # As Megatron: one prefix per split is used directly, weight or not.
                out[split.value] = self._build_megatron_dataset_splits(blend[0][0], matrix, sizes)[split.value]
            else:
                out[split.value] = self._build_blend(blend, matrix, sizes)[split.value]
        return out

    def _build_blend(self, blend, matrix, sizes) -> List[Optional[Any]]:
        prefixes, weights = blend
        if weights is not None:
            weights = normalize(weights)
        if len(prefixes) == 1 and weights is None:
            return self._build_megatron_dataset_splits(prefixes[0], matrix, sizes)
        if weights is None:
            per_dataset = [[None] * len(Split) for _ in prefixes]
            target = None
        else:
            target = get_size_per_split_per_dataset(weights, sizes)
            per_dataset = get_size_per_split_per_dataset(weights, sizes, self.config.mid_level_dataset_surplus)
        mid = self._build_megatron_datasets_parallel(prefixes, matrix, per_dataset)
        out: List[Optional[Any]] = [None] * len(Split)
        for i in range(len(Split)):
            if matrix[i] is None:
                continue
            if weights is not None:
                size_i = sum(t[i] for t in target)
                weights_i = weights
            else:
                weights_i = [0 if d is None else len(d) for d in mid[i]]
                size_i = None if sizes[i] is None else min(sizes[i], sum(weights_i))
            out[i] = self.build_generic_dataset(_blend_present, self.is_built_on_rank, True, mid[i], weights_i,
                                                size_i, self.config)
        return out

    def _build_megatron_datasets_parallel(self, prefixes, matrix, sizes_per_dataset) -> List[List[Optional[MegatronDataset]]]:
        """Per split, the mid-level dataset of each prefix; rank 0 first, then the others."""
        results: List[List[Optional[MegatronDataset]]] = [[] for _ in Split]

        def run(threads: int) -> None:
            with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
                futures = [pool.submit(self._build_megatron_dataset_splits, p, matrix, s, False)
                           for p, s in zip(prefixes, sizes_per_dataset)]
                for future in futures:
                    for j, dataset in enumerate(future.result()):
                        results[j].append(dataset)

        threads = self.config.num_dataset_builder_threads
        if _distributed():
            rank = torch.distributed.get_rank()
            if rank == 0:
                run(threads)
            _barrier()
            if rank != 0:
                run(threads)
        else:
            run(threads)
        return results

    def _build_megatron_dataset_splits(self, dataset_path: Optional[str], matrix, sizes,
                                       synchronize_ranks: bool = True) -> List[Optional[MegatronDataset]]:
        """Each split of the low-level dataset at ``dataset_path`` as a mid-level dataset."""
        if _distributed() and not self.is_built_on_rank():
            for bookend in matrix:
                if bookend is not None and synchronize_ranks:
                    _barrier()
            return [None] * len(Split)
        low_level = self.cls.build_low_level_dataset(dataset_path, self.config)
        num_elements = self.cls.numel_low_level_dataset(low_level)
        out: List[Optional[MegatronDataset]] = []
        for split, bookend in zip(Split, matrix):
            if bookend is None:
                out.append(None)
                continue
            indices = split_element_range(bookend, num_elements)
            if len(indices) == 0 and split != Split.train:
                # A tiny corpus can round a small split to nothing; evaluate without it.
                logger.warning("the %s split of %s holds no documents (split %s); it is not built",
                               split.name, dataset_path, self.config.split)
                if synchronize_ranks and _distributed():
                    _barrier()  # the barrier build_generic_dataset would have held
                out.append(None)
                continue
            out.append(self.build_generic_dataset(self.cls, self.is_built_on_rank, synchronize_ranks, low_level,
                                                  dataset_path, indices, sizes[split.value], split, self.config))
        return out

    @staticmethod
    def build_generic_dataset(cls: Callable, is_built_on_rank: Callable[[], bool], synchronize_ranks: bool,
                              *args: Any) -> Optional[Any]:
        """``cls(*args)``: on rank 0 first, then (after a barrier) on the other building ranks."""
        if not _distributed():
            return cls(*args)
        rank = torch.distributed.get_rank()
        dataset = None
        if rank == 0 and is_built_on_rank():
            try:
                dataset = cls(*args)
            except OSError as err:
                raise OSError(
                    f"could not write the dataset index cache ({err}); pass a writable --data-cache-path"
                ) from err
        if synchronize_ranks:
            _barrier()
        if rank != 0 and is_built_on_rank():
            dataset = cls(*args)
        return dataset
