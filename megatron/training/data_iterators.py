"""Datasets and iterators for training, validation and test."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron.core.fake_backend import is_fake
from megatron.core.process_groups import ProcessGroups
from megatron.training.datasets.data_samplers import build_pretraining_data_loader
from megatron.training.global_vars import get_args
from megatron.training.phase_transitions import phase_consumed_samples, phase_train_samples
from megatron.training.rank_print import print_rank_0
from megatron.training.validation_sets import build_validation_sets, check_validation_set_args, uses_validation_sets
from megatron.training.run_state import RunState


def train_valid_test_num_samples(args):
    """Samples each split must provide (megatron-facts section 3.1).

    With no --eval-interval, validation runs only once, after training. An evaluation-only
    run (--skip-train without --train-iters/--train-samples) asks for no training samples.
    """
    if args.train_samples:
        train = args.train_samples
    elif args.train_iters:
        train = args.train_iters * args.global_batch_size
    else:
        train = 0
    train = phase_train_samples(args, train)  # --phase-transition-iterations: this phase's share
    evals = 1 if not args.eval_interval else (args.train_iters or 0) // args.eval_interval + 1
    if args.eval_interval and args.start_eval_at_iter is not None:
        # Megatron drops the evaluations skipped before --start-eval-at-iter; the one after
        # training still runs, so at least one evaluation's worth is kept.
        evals = max(1, evals - args.start_eval_at_iter // args.eval_interval)
    eval_gbs = args.eval_global_batch_size or args.global_batch_size
    # --full-validation: one epoch of validation data (None), read whole at each evaluation.
    valid = None if args.full_validation else evals * args.eval_iters * eval_gbs
    test = args.eval_iters * eval_gbs
    return train, valid, test


def reads_data(pg: ProcessGroups) -> bool:
    """Whether this tensor-parallel rank reads data: rank 0, which broadcasts it to the others;
    on torch's fake backend (--fake-process-group) every rank, since a broadcast delivers
    nothing (``tensor_parallel.broadcast_data`` then keeps each rank's own data)."""
    return pg.rank("tp") == 0 or is_fake(pg.tp)


def is_dataset_built_on_rank(pg: ProcessGroups) -> bool:
    """Data is read on tensor-parallel rank 0 (``reads_data``) of the first and last stage,
    then broadcast; with --fake-process-group the datasets are built on every rank, so that
    a middle stage knows, as the real job's agreement would tell it, which splits have data."""
    if is_fake(pg.tp):
        return True
    return reads_data(pg) and (pg.is_pipeline_first_stage() or pg.is_pipeline_last_stage())


def _start_position(dataset, consumed: int, dataloader_type: str) -> int:
    """Where the sampler starts: the consumed-samples count. A validation set read past
    its end starts over (the cyclic sampler wraps by itself)."""
    if dataloader_type == "single" and consumed >= len(dataset):
        return consumed % len(dataset)
    return consumed


def _cyclic(loader):
    while True:
        for batch in loader:
            yield batch


def _eval_loader_builder(args, pg: ProcessGroups) -> Callable:
    """``make(dataset, start)``: a loader of evaluation-sized micro-batches for this rank."""
    def make(dataset, start):
        return build_pretraining_data_loader(
            dataset, start, micro_batch_size=args.eval_micro_batch_size or args.micro_batch_size,
            data_parallel_rank=pg.rank("dp"), data_parallel_size=pg.size("dp"),
            dataloader_type=args.dataloader_type or "single", num_workers=args.num_workers, seed=args.seed,
            data_sharding=args.data_sharding)
    return make


def build_train_valid_test_data_iterators(datasets_provider: Callable, pg: ProcessGroups,
                                          run_state: Optional[RunState] = None):
    """(train, valid, test) iterators; None where a split is absent or on ranks without data.

    The training and validation iterators start at ``run_state``'s consumed-sample counts
    (without one, at those on ``args``, where Megatron's scripts keep them)."""
    args = get_args()
    state = run_state if run_state is not None else RunState.from_args(args)
    check_validation_set_args(args)
    loaders = [None, None, None]
    num_samples = train_valid_test_num_samples(args)
    print_rank_0(f" > datasets target sizes (train, valid, test): {num_samples}")
    # Every rank calls the provider: the dataset builder synchronizes ranks (rank 0 writes
    # the index caches first) and returns None where is_dataset_built_on_rank is False.
    datasets = datasets_provider(num_samples)
    # A loader wherever the provider built datasets on a tensor-parallel rank 0: the first
    # and last stages for GPT, every stage for families whose middle stages need data too
    # (BERT's padding mask); with --fake-process-group on every rank (``reads_data``).
    if reads_data(pg) and any(ds is not None for ds in datasets):
        consumed = [phase_consumed_samples(args, state.consumed_train_samples), state.consumed_valid_samples, 0]
        eval_mbs = args.eval_micro_batch_size or args.micro_batch_size
        for i, (ds, start) in enumerate(zip(datasets, consumed)):
            if ds is None or (i == 1 and uses_validation_sets(args)) or len(ds) == 0:
                continue
            loaders[i] = build_pretraining_data_loader(
                ds,
                _start_position(ds, start, args.dataloader_type or "single"),
                micro_batch_size=args.micro_batch_size if i == 0 else eval_mbs,
                data_parallel_rank=pg.rank("dp"),
                data_parallel_size=pg.size("dp"),
                dataloader_type=args.dataloader_type or "single",
                num_workers=args.num_workers,
                seed=args.seed,
                data_sharding=args.data_sharding,
            )
    valid_sets = None
    if uses_validation_sets(args):
        valid_sets = build_validation_sets(args, datasets[1] if reads_data(pg) else None, pg.size("dp"),
                                           _eval_loader_builder(args, pg))
    flags = torch.tensor([int(l is not None) for l in loaders], dtype=torch.long)
    if valid_sets is not None:
        flags[1] = int(any(s.eval_iters > 0 for s in valid_sets))
    if torch.cuda.is_available():
        flags = flags.cuda()
    if dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    args.do_train, args.do_valid, args.do_test = (bool(f) for f in flags.tolist())
    args.do_valid = args.do_valid and (args.eval_iters > 0 or valid_sets is not None)
    args.do_test = args.do_test and args.eval_iters > 0
    cyclic = (args.dataloader_type or "single") == "cyclic"
    train = None
    if loaders[0] is not None:
        train = _cyclic(loaders[0]) if cyclic else iter(loaders[0])
    valid = _cyclic(loaders[1]) if loaders[1] is not None else valid_sets
    test = _cyclic(loaders[2]) if loaders[2] is not None else None
    return train, valid, test
