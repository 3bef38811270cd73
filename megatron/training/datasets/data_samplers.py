"""Batch samplers and the pretraining data loader (--dataloader-type single|cyclic)."""

from __future__ import annotations

import signal

import numpy
import torch


class MegatronPretrainingSampler:
    """Walk sample ids in order from ``consumed_samples``; each data-parallel rank takes
    its ``micro_batch_size`` slice of every ``micro_batch_size * dp`` block.

    Resuming with the saved ``consumed_samples`` continues exactly where training stopped.
    """

    def __init__(self, total_samples, consumed_samples, micro_batch_size, data_parallel_rank,
                 data_parallel_size, drop_last=True):
        if total_samples <= 0:
            raise ValueError(f"no samples to draw from (total_samples={total_samples})")
        if consumed_samples >= total_samples:
            raise ValueError(
                f"consumed samples {consumed_samples} >= dataset size {total_samples}: the data is "
                "exhausted; train for fewer iterations or use more data"
            )
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} not in [0, {data_parallel_size})")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.block = micro_batch_size * data_parallel_size
        self.drop_last = drop_last

    def __len__(self):
        return self.total_samples

    def _slice(self):
        start = self.data_parallel_rank * self.micro_batch_size
        return start, start + self.micro_batch_size

    def __iter__(self):
        batch = []
        for idx in range(self.consumed_samples, self.total_samples):
            batch.append(idx)
            if len(batch) == self.block:
                s, e = self._slice()
                yield batch[s:e]
                batch = []
        if batch and not self.drop_last:
            s, e = self._slice()
            yield batch[s:e]


class MegatronPretrainingRandomSampler:
    """Random order (--dataloader-type cyclic), as Megatron's. With ``data_sharding`` (the
    default) each data-parallel rank owns a contiguous bucket of ``(total // (mbs * dp)) *
    mbs`` samples and walks it in a ``torch.randperm`` order seeded with the epoch number;
    without it (--no-data-sharding) one permutation of ``(total // mbs) * mbs`` samples is
    dealt out to the ranks in turn, so every rank draws from the whole dataset. One pass of
    ``__iter__`` covers the rest of the current epoch; ``consumed_samples`` advances by ``mbs
    * dp`` per batch, so iterating again (or resuming with the saved count) continues with
    the next batch.
    """

    def __init__(self, total_samples, consumed_samples, micro_batch_size, data_parallel_rank,
                 data_parallel_size, seed=None, data_sharding: bool = True):
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} not in [0, {data_parallel_size})")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.block = micro_batch_size * data_parallel_size
        self.data_sharding = data_sharding
        self.last_batch_size = total_samples % self.block
        if total_samples < self.block:
            raise ValueError(
                f"dataset of {total_samples} samples is smaller than one global micro-batch "
                f"({self.block}); use more data or a smaller --micro-batch-size"
            )

    def __len__(self):
        return self.total_samples

    def __iter__(self):
        active = self.total_samples - self.last_batch_size
        epoch = self.consumed_samples // active
        current = self.consumed_samples % active
        if current % self.block:
            raise ValueError(
                f"consumed samples {self.consumed_samples} is not a multiple of micro-batch x data-parallel "
                f"size {self.block}; resume with the count the checkpoint saved"
            )
        g = torch.Generator()
        g.manual_seed(epoch)
        if self.data_sharding:
            bucket_size = (self.total_samples // self.block) * self.micro_batch_size
            start = self.data_parallel_rank * bucket_size
            order = torch.randperm(bucket_size, generator=g).tolist()
            indices = [start + x for x in order[current // self.data_parallel_size:]]
        else:
            full_size = (self.total_samples // self.micro_batch_size) * self.micro_batch_size
            order = torch.randperm(full_size, generator=g).tolist()
            indices = order[current:][self.data_parallel_rank::self.data_parallel_size]
        batch = []
        for index in indices:
            batch.append(index)
            if len(batch) == self.micro_batch_size:
                self.consumed_samples += self.block
                yield batch
                batch = []


def build_pretraining_data_loader(dataset, consumed_samples, *, micro_batch_size, data_parallel_rank,
                                  data_parallel_size, dataloader_type="single", num_workers=2, seed=1234,
                                  data_sharding: bool = True):
    """A DataLoader for ``dataset`` that resumes at ``consumed_samples`` (``data_sharding``:
    see ``MegatronPretrainingRandomSampler``; the sequential order has no other form)."""
    if dataset is None:
        return None
    if dataloader_type == "single":
        sampler = MegatronPretrainingSampler(len(dataset), consumed_samples, micro_batch_size,
                                             data_parallel_rank, data_parallel_size)
    elif dataloader_type == "cyclic":
        sampler = MegatronPretrainingRandomSampler(len(dataset), consumed_samples, micro_batch_size,
                                                   data_parallel_rank, data_parallel_size,
                                                   data_sharding=data_sharding)
    else:
        raise ValueError(f"--dataloader-type {dataloader_type!r} is not supported here; use single or cyclic")
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        worker_init_fn=_seed_worker,
        # Starting an iterator draws a seed from this generator; without its own it would
        # draw from the global one, which a resumed run has just restored from the
        # checkpoint (dropout on CPU would no longer continue bit-exactly).
        generator=torch.Generator().manual_seed(seed),
    )


def _seed_worker(worker_id):
    seed = torch.initial_seed() % 2**32
    numpy.random.seed(seed)
    _ignore_stop_signals()


def _ignore_stop_signals():
    """A worker ignores SIGTERM and SIGINT. Launchers (slurm's --signal, Kubernetes,
    torchrun) signal the rank's whole process group; a worker killed by it makes the
    rank fail with "DataLoader worker is killed" before its --exit-signal-handler can
    save. The rank stops its workers itself, and they exit when it dies."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)
