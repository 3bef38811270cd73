"""On torch's fake backend nothing is delivered: buffers only a receive would fill start at
zero, all-gather and reduce-scatter outputs hold this rank's own blocks whatever the torch
release writes, and a data broadcast keeps the data each rank read itself."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron.core.fake_backend import gather_output, is_fake, receive_buffer, scatter_output
from megatron.core.pipeline_parallel.p2p_communication import P2PConfig, exchange_with_neighbours
from megatron.core.tensor_parallel.collectives import all_gather_first_dim, reduce_scatter_first_dim
from megatron.core.tensor_parallel.data import broadcast_data


@pytest.fixture
def fake_world():
    """Rank 1 of 4 on the fake backend, in this process only."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=4)
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.fixture
def nan_for_uninitialized():
    """torch.empty fills its tensors with NaN (deterministic mode), so that a buffer no
    receive wrote is seen."""
    import torch.utils.deterministic

    was, fill = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(was)
    torch.utils.deterministic.fill_uninitialized_memory = fill


def test_not_fake_without_a_process_group(nan_for_uninitialized):
    assert not is_fake()
    assert receive_buffer((2, 3), torch.float32, "cpu", None).isnan().all()  # torch.empty, as before


def test_pipeline_receives_are_zeros(fake_world, nan_for_uninitialized):
    assert is_fake() and is_fake(fake_world)
    cfg = P2PConfig(fake_world, (4, 2, 8), torch.float32, torch.device("cpu"))
    from_prev, from_next = exchange_with_neighbours(cfg, send_next=torch.full((4, 2, 8), 7.0), recv_prev=True,
                                                    recv_next=True)
    assert from_prev.requires_grad and not from_next.requires_grad
    assert torch.equal(from_prev.detach(), torch.zeros(4, 2, 8)) and torch.equal(from_next, torch.zeros(4, 2, 8))


def test_a_data_broadcast_keeps_each_ranks_own_data(fake_world):
    """Rank 1 is not the source; on a real group it would get rank 0's tensors, here its own."""
    data = {"tokens": torch.arange(6).view(2, 3), "labels": torch.arange(6).view(2, 3) + 10}
    for shapes in (None, {"tokens": (2, 3), "labels": (2, 3)}):
        out = broadcast_data(["tokens", "labels"], data, torch.int64, fake_world, shapes)
        assert torch.equal(out["tokens"], data["tokens"]) and torch.equal(out["labels"], data["labels"])
    with pytest.raises(ValueError, match="every rank of a fake-backend group"):
        broadcast_data(["tokens"], None, torch.int64, fake_world)


def test_gather_and_scatter_outputs_hold_this_ranks_blocks(fake_world, nan_for_uninitialized):
    """Torch 2.11's fake backend writes nothing into a reduce-scatter's output; both outputs are
    filled beforehand, so the values do not depend on the release."""
    block = torch.arange(6.0).view(2, 3)
    assert torch.equal(gather_output(block, 4, fake_world), block.repeat(4, 1))
    full = torch.arange(24.0).view(8, 3)
    assert torch.equal(scatter_output(full, 4, fake_world), full[2:4])  # rank 1's block
    assert torch.equal(all_gather_first_dim(block, fake_world), block.repeat(4, 1))
    assert torch.equal(reduce_scatter_first_dim(full, fake_world), full[2:4])
