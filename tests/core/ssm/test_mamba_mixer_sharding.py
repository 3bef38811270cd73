"""The mixer's fused weights (unequal parts, each split over tensor-parallel ranks) are
placed in a checkpoint at their TP=1 positions, so checkpoints reshard between TP sizes."""

import torch

from megatron.core.dist_checkpointing.model_sharding import _part_pieces
from megatron.core.ssm.mamba_mixer import _rank_block


def test_parts_land_at_their_tp1_rows():
    sizes = [4, 4, 2, 2, 6]  # z, x, B, C, dt rows of a TP=1 in_proj
    full = torch.arange(sum(sizes) * 3).reshape(sum(sizes), 3)
    world = 2
    assembled = torch.empty_like(full)
    for rank in range(world):
        local = _rank_block(full, sizes, rank, world)
        for start, length, offset in _part_pieces("in_proj.weight", local.shape[0], [s // world for s in sizes],
                                                  world, rank):
            assembled[offset:offset + length] = local[start:start + length]
    assert torch.equal(assembled, full)
    # Rank 1 holds the second half of each part, not the second half of the whole.
    assert torch.equal(_rank_block(full, sizes, 1, world)[:2], full[2:4])
