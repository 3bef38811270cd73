"""Validation over the whole set (--full-validation) and over several sets (--multiple-validation-sets).

With either flag, the validation slot of the data iterators is a ``ValidationSets`` list and
``evaluate_and_print_results`` evaluates each entry on its own:

- --full-validation: the validation dataset is built for one epoch, and every evaluation reads
  all of it, from its first sample, in ``ceil(len / eval global batch)`` batches. The last
  batch is filled up with copies of sample 0 whose loss mask is zero, so every sample counts
  once and no sample twice.
- --multiple-validation-sets (needs --full-validation, as in Megatron-LM): each prefix of
  --valid-data-path is a set of its own, printed and written to TensorBoard as
  ``validation-<index>`` (``validation-<name>`` with --validation-set-names).
"""

from __future__ import annotations

import argparse
import math
from typing import Callable, Iterator, List, NamedTuple, Optional

import torch
import torch.distributed as dist

from megatron.training.datasets.blend_args import get_blend_and_blend_per_split
from megatron.training.eval_batches import eval_batches


class ValidationSet(NamedTuple):
    label: str  # "validation", "validation-0", "validation-<name>"
    iterator: Optional[Iterator]  # None on ranks that read no data
    eval_iters: int  # global batches per evaluation


class ValidationSets(list):
    """The ``ValidationSet`` entries evaluated one after the other at each evaluation."""


def uses_validation_sets(args: argparse.Namespace) -> bool:
    return bool(args.full_validation or args.multiple_validation_sets)


def check_validation_set_args(args: argparse.Namespace) -> None:
    """The flag combinations Megatron-LM accepts; ValueError naming the fix otherwise."""
    if args.multiple_validation_sets and not args.full_validation:
        raise ValueError("--multiple-validation-sets needs --full-validation: each set is evaluated whole "
                         "(as in Megatron-LM); add --full-validation")
    if args.validation_set_names and not args.multiple_validation_sets:
        raise ValueError("--validation-set-names names the sets of --multiple-validation-sets; add that flag "
                         "or drop the names")


def validation_labels(args: argparse.Namespace) -> List[str]:
    """The label of each validation set, in the order of --valid-data-path."""
    if not args.multiple_validation_sets:
        return ["validation"]
    blend_per_split = None if args.mock_data else get_blend_and_blend_per_split(args)[1]
    prefixes = blend_per_split[1][0] if blend_per_split and blend_per_split[1] else []
    count = max(1, len(prefixes))
    names = args.validation_set_names
    if names is not None and len(names) != count:
        raise ValueError(f"--validation-set-names gives {len(names)} names for {count} validation sets "
                         f"(the prefixes of --valid-data-path); give one name per prefix")
    return [f"validation-{name}" for name in (names or range(count))]


class PaddedToMultiple(torch.utils.data.Dataset):
    """``dataset`` lengthened to a multiple of ``multiple`` with loss-free copies of sample 0."""

    def __init__(self, dataset, multiple: int) -> None:
        self.dataset = dataset
        self.size = math.ceil(len(dataset) / multiple) * multiple

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int):
        if idx < len(self.dataset):
            return self.dataset[idx]
        sample = dict(self.dataset[0])
        sample["loss_mask"] = torch.zeros_like(sample["loss_mask"])
        return sample


def _cyclic(loader):
    while True:
        for batch in loader:
            yield batch


def build_validation_sets(args: argparse.Namespace, valid, data_parallel_size: int,
                          make_loader: Callable) -> ValidationSets:
    """One ``ValidationSet`` per label. ``valid`` is the provider's validation dataset, a list
    of them (several sets) or None (ranks without data); ``make_loader(dataset, start)``
    builds a loader of evaluation-sized micro-batches. Every rank gets the same eval_iters
    (``ceil(len / evaluation global batch)``)."""
    labels = validation_labels(args)
    datasets = valid if isinstance(valid, list) else [valid] * (1 if valid is not None else len(labels))
    if valid is not None and len(datasets) != len(labels):
        raise ValueError(f"{len(datasets)} validation datasets were built for {len(labels)} validation sets")
    gbs = eval_batches(args, data_parallel_size).global_batch_size
    # --multiple-validation-sets needs --full-validation (check_validation_set_args), so every
    # set here is read whole.
    counts = torch.tensor([0 if ds is None else math.ceil(len(ds) / gbs) for ds in datasets], dtype=torch.long)
    if torch.cuda.is_available():
        counts = counts.cuda()
    if dist.is_initialized():
        # Ranks that read no data (tensor-parallel ranks > 0, middle stages) learn the counts.
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    sets = ValidationSets()
    for label, ds, count in zip(labels, datasets, counts.tolist()):
        # Each evaluation reads one whole pass from sample 0: the padded length is a multiple
        # of the evaluation batch, so the cycle stays aligned with evaluations.
        iterator = None if ds is None or len(ds) == 0 else _cyclic(make_loader(PaddedToMultiple(ds, gbs), 0))
        sets.append(ValidationSet(label, iterator, int(count)))
    return sets
