"""Base of the mid-level datasets: identity, description and hash for the index caches."""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from typing import Dict, List, Optional, Protocol

import numpy
import torch

from megatron.core.datasets.blended_megatron_dataset_config import BlendedMegatronDatasetConfig
from megatron.core.datasets.split import Split


class LowLevelDataset(Protocol):
    """What a mid-level dataset reads from: ``IndexedDataset`` or a mock stand-in."""

    sequence_lengths: numpy.ndarray

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> numpy.ndarray: ...


def describe(identifiers: "OrderedDict[str, object]") -> str:
    """The cache description: ``json.dumps(indent=4)``; nested objects (the tokenizer)
    are written as their ``unique_identifiers``."""
    return json.dumps(identifiers, indent=4, default=_identifiers_of)


def _identifiers_of(obj: object) -> object:
    if hasattr(obj, "unique_identifiers"):
        return obj.unique_identifiers
    raise TypeError(
        f"{type(obj).__name__} has no unique_identifiers; the dataset cache needs them to tell "
        "configurations apart (give the tokenizer a unique_identifiers dict)"
    )


def md5_hex(text: str) -> str:
    """Hex MD5 of the UTF-8 bytes of ``text`` (the cache file prefix)."""
    return hashlib.md5(text.encode("utf-8"), usedforsecurity=False).hexdigest()


class MegatronDataset(torch.utils.data.Dataset):
    """A dataset of samples drawn from ``indices`` of a low-level dataset.

    ``unique_identifiers`` holds, in this order: class, dataset_path, num_samples,
    index_split, then each of ``_key_config_attributes()`` of the config. Its JSON
    (``unique_description``) and that JSON's MD5 (``unique_description_hash``) name the cache.
    """

    def __init__(
        self,
        dataset: LowLevelDataset,
        dataset_path: Optional[str],
        indices: numpy.ndarray,
        num_samples: Optional[int],
        index_split: Split,
        config: BlendedMegatronDatasetConfig,
    ) -> None:
        self.dataset = dataset
        self.dataset_path = dataset_path
        self.indices = indices
        self.num_samples = num_samples
        self.index_split = index_split
        self.config = config
        self.unique_identifiers = OrderedDict()
        self.unique_identifiers["class"] = type(self).__name__
        self.unique_identifiers["dataset_path"] = dataset_path
        self.unique_identifiers["num_samples"] = num_samples
        self.unique_identifiers["index_split"] = index_split.name
        for attr in self._key_config_attributes():
            self.unique_identifiers[attr] = getattr(config, attr)
        self.unique_description = describe(self.unique_identifiers)
        self.unique_description_hash = md5_hex(self.unique_description)

    @staticmethod
    def _key_config_attributes() -> List[str]:
        """Config fields that change the samples, hence the cache."""
        return ["random_seed", "sequence_length", "split", "split_matrix", "tokenizer"]

    @staticmethod
    def numel_low_level_dataset(low_level_dataset: LowLevelDataset) -> int:
        """Number of elements that the split fractions apply to."""
        raise NotImplementedError

    @staticmethod
    def build_low_level_dataset(dataset_path: Optional[str], config: BlendedMegatronDatasetConfig) -> LowLevelDataset:
        """Open the low-level dataset at ``dataset_path``."""
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        raise NotImplementedError
