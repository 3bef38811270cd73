"""The checkpoint collectives run over the group they are given; the group is made and
released by the entry point that opens a ``CheckpointComm``, never cached by the module."""

import torch.distributed as dist

from megatron.training.checkpointing import collectives
from megatron.training.checkpointing.collectives import (
    CheckpointComm,
    all_gather_objects,
    barrier,
    broadcast_from_rank0,
)
from tests.multirank import run_on_ranks


def test_without_distributed_every_collective_is_the_identity():
    comm = CheckpointComm.open()
    assert (comm.rank, comm.world, comm.group) == (0, 1, None)
    assert all_gather_objects("a", comm.group) == ["a"]
    assert broadcast_from_rank0({"x": 1}, comm.group) == {"x": 1}
    barrier(comm.group)
    comm.close()


def _open_use_close(rank, world_size):
    seen = []
    for attempt in range(2):  # a second save/load opens a fresh group after the first closed its own
        comm = CheckpointComm.open()
        assert comm.group is not dist.group.WORLD and dist.get_backend(comm.group) == "gloo"
        seen.append((all_gather_objects(rank * 10 + attempt, comm.group),
                     broadcast_from_rank0(f"from {rank}", comm.group)))
        barrier(comm.group)
        comm.close()
        assert comm.group is None
    # A singleton group: the gather covers that group's ranks, not the world's.
    singletons = [dist.new_group([r], backend="gloo") for r in range(world_size)]
    seen.append(all_gather_objects(rank, singletons[rank]))
    return seen, [name for name in vars(collectives) if name.startswith("_GROUP")]


def test_collectives_over_the_group_passed_in():
    (seen0, cached0), (seen1, _) = run_on_ranks(_open_use_close, world_size=2)
    assert seen0[:2] == [([0, 10], "from 0"), ([1, 11], "from 0")]
    assert seen1[:2] == seen0[:2]
    assert seen0[2] == [0] and seen1[2] == [1]
    assert cached0 == []
