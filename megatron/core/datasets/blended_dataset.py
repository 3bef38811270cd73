"""A weighted interleave of several mid-level datasets (megatron-facts section 3.4)."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import numpy
import torch

from megatron.core.datasets.blended_megatron_dataset_config import BlendedMegatronDatasetConfig
from megatron.core.datasets.blending_indices import build_blending_indices, build_exhaustive_blending_indices
from megatron.core.datasets.index_cache import IndexCache, global_rank
from megatron.core.datasets.megatron_dataset import MegatronDataset, describe, md5_hex
from megatron.core.datasets.split import normalize

logger = logging.getLogger(__name__)

_INDEX_NAMES = ("dataset_index", "dataset_sample_index")


class BlendedDataset(torch.utils.data.Dataset):
    """``size`` samples interleaved from ``datasets`` in proportion to ``weights``.

    ``size`` None draws every sample of every dataset exactly once (weights are then the
    dataset lengths). Items are ``{"dataset_id": i, **datasets[i][j]}``. Indices are cached
    in ``config.path_to_cache`` only when it is set. Raises ValueError when a dataset would
    be asked for more samples than it holds.
    """

    def __init__(self, datasets: List[MegatronDataset], weights: Sequence[float], size: Optional[int],
                 config: BlendedMegatronDatasetConfig) -> None:
        if len(datasets) != len(weights):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights; give one weight per dataset")
        if len(datasets) >= 32767:
            raise ValueError(f"a blend holds fewer than 32767 datasets, got {len(datasets)}")
        if len(datasets) == 1:
            logger.warning("building a BlendedDataset of a single dataset")
        self.datasets = datasets
        self.weights = normalize(weights)
        self.size = size
        self.config = config
        self.split = datasets[0].index_split
        identifiers = OrderedDict()
        identifiers["class"] = type(self).__name__
        identifiers["datasets"] = [d.unique_identifiers for d in datasets]
        identifiers["split"] = self.split.name
        identifiers["weights"] = self.weights
        identifiers["size"] = size
        self.unique_identifiers = identifiers
        self.unique_description = describe(identifiers)
        self.unique_description_hash = md5_hex(self.unique_description)
        self.built_anew_on_cache_miss = False
        self.dataset_index, self.dataset_sample_index = self._build_indices()
        if self.size is None:
            self.size = len(self.dataset_index)
        self._check_not_oversampled()

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> Dict[str, object]:
        if not 0 <= idx < self.size:
            raise IndexError(f"sample {idx} outside a blend of {self.size}")
        dataset_id = int(self.dataset_index[idx])
        return {"dataset_id": dataset_id, **self.datasets[dataset_id][int(self.dataset_sample_index[idx])]}

    def _cache(self) -> Optional[IndexCache]:
        if not self.config.path_to_cache:
            return None
        base = f"{self.unique_description_hash}-{type(self).__name__}-{self.split.name}"
        return IndexCache(self.config.path_to_cache, base, _INDEX_NAMES)

    def _build_indices(self):
        cache = self._cache()
        if cache is not None and cache.hit():
            arrays = cache.load()
            return arrays["dataset_index"], arrays["dataset_sample_index"]
        started = time.time()
        if self.size is None:
            arrays = build_exhaustive_blending_indices([len(d) for d in self.datasets])
        else:
            arrays = build_blending_indices(self.weights, self.size)
        self.built_anew_on_cache_miss = True
        if cache is not None and global_rank() == 0:
            cache.save(self.unique_description, dict(zip(_INDEX_NAMES, arrays)))
        logger.info("built blending indices of %d samples in %.2f s", len(arrays[0]), time.time() - started)
        return arrays

    def _check_not_oversampled(self) -> None:
        index = numpy.asarray(self.dataset_index)
        sample = numpy.asarray(self.dataset_sample_index)
        for i, dataset in enumerate(self.datasets):
            mine = sample[index == i]
            need = int(mine.max()) + 1 if mine.size else 0
            if need > len(dataset):
                raise ValueError(
                    f"the blend asks dataset {i} ({getattr(dataset, 'dataset_path', '?')}) for {need} samples "
                    f"but it holds {len(dataset)}; raise --mid-level-dataset-surplus "
                    f"(now {self.config.mid_level_dataset_surplus}) or change the weights"
                )
