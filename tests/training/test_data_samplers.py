"""Samplers: per-data-parallel-rank slices and exact resume from the consumed-samples count."""

import itertools

import pytest
import torch

from megatron.training.datasets.data_samplers import (
    MegatronPretrainingRandomSampler,
    MegatronPretrainingSampler,
    build_pretraining_data_loader,
)

MBS, DP = 3, 4


def test_single_sampler_slices_each_block_per_rank():
    total = 50
    per_rank = [list(MegatronPretrainingSampler(total, 0, MBS, r, DP)) for r in range(DP)]
    blocks = total // (MBS * DP)
    for step in range(blocks):
        merged = [i for r in range(DP) for i in per_rank[r][step]]
        assert merged == list(range(step * MBS * DP, (step + 1) * MBS * DP))
    assert all(len(batches) == blocks for batches in per_rank)


@pytest.mark.parametrize("steps_done", [1, 2, 3])
def test_single_sampler_resume_continues_exactly(steps_done):
    full = list(MegatronPretrainingSampler(60, 0, MBS, 2, DP))
    resumed = list(MegatronPretrainingSampler(60, steps_done * MBS * DP, MBS, 2, DP))
    assert resumed == full[steps_done:]


def test_single_sampler_rejects_exhausted_data():
    with pytest.raises(ValueError, match="exhausted"):
        MegatronPretrainingSampler(10, 10, 1, 0, 1)


def _forever(sampler):
    while True:
        yield from sampler


def _epoch_batches(sampler):
    return list(iter(sampler))


def test_cyclic_sampler_buckets_and_epoch_seed():
    total = 53
    bucket = (total // (MBS * DP)) * MBS
    for r in range(DP):
        sampler = MegatronPretrainingRandomSampler(total, 0, MBS, r, DP)
        ids = [i for b in _epoch_batches(sampler) for i in b]
        expected = [r * bucket + x for x in torch.randperm(bucket, generator=torch.Generator().manual_seed(0)).tolist()]
        assert ids == expected
        assert sampler.consumed_samples == bucket * DP
        second = [i for b in _epoch_batches(sampler) for i in b]
        assert sorted(second) == sorted(ids) and second != ids  # next epoch: same bucket, new order


def test_cyclic_sampler_resume_continues_exactly():
    total = 53
    full = MegatronPretrainingRandomSampler(total, 0, MBS, 1, DP)
    stream = list(itertools.islice(_forever(full), 12))  # three epochs of four batches
    for done in (1, 4, 7):
        resumed = MegatronPretrainingRandomSampler(total, done * MBS * DP, MBS, 1, DP)
        tail = list(itertools.islice(_forever(resumed), 12 - done))
        assert tail == stream[done:]
    with pytest.raises(ValueError, match="multiple"):
        next(iter(MegatronPretrainingRandomSampler(total, 5, MBS, 1, DP)))


def test_cyclic_sampler_without_data_sharding_deals_one_shuffle_to_the_ranks():
    total = 53
    full = (total // MBS) * MBS
    shuffle = torch.randperm(full, generator=torch.Generator().manual_seed(0)).tolist()
    seen = []
    for r in range(DP):
        sampler = MegatronPretrainingRandomSampler(total, 0, MBS, r, DP, data_sharding=False)
        batches = _epoch_batches(sampler)
        dealt = shuffle[r::DP]
        assert batches == [dealt[i:i + MBS] for i in range(0, len(dealt) - MBS + 1, MBS)]
        assert sampler.consumed_samples == 4 * MBS * DP
        seen += [i for b in batches for i in b]
    assert len(seen) == len(set(seen))  # the ranks never read the same sample in one epoch
    sharded = MegatronPretrainingRandomSampler(total, 0, MBS, 0, DP)
    assert max(i for b in _epoch_batches(sharded) for i in b) < (total // (MBS * DP)) * MBS
    unsharded = MegatronPretrainingRandomSampler(total, 0, MBS, 0, DP, data_sharding=False)
    assert max(i for b in _epoch_batches(unsharded) for i in b) >= (total // (MBS * DP)) * MBS


def test_cyclic_sampler_without_data_sharding_resumes_exactly():
    total = 53
    stream = list(itertools.islice(_forever(MegatronPretrainingRandomSampler(total, 0, MBS, 2, DP,
                                                                             data_sharding=False)), 12))
    for done in (1, 5):
        resumed = MegatronPretrainingRandomSampler(total, done * MBS * DP, MBS, 2, DP, data_sharding=False)
        assert list(itertools.islice(_forever(resumed), 12 - done)) == stream[done:]


class _Range(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"x": torch.tensor(i)}


def test_loader_resumes_where_it_stopped():
    kw = dict(micro_batch_size=2, data_parallel_rank=1, data_parallel_size=2, num_workers=0)
    first = [b["x"].tolist() for b in build_pretraining_data_loader(_Range(40), 0, **kw)]
    resumed = [b["x"].tolist() for b in build_pretraining_data_loader(_Range(40), 12, **kw)]
    assert first[:2] == [[2, 3], [6, 7]] and resumed == first[3:]
    with pytest.raises(ValueError, match="--dataloader-type"):
        build_pretraining_data_loader(_Range(40), 0, dataloader_type="external", **kw)
