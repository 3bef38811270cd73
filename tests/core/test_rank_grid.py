"""Rank arithmetic of the parallel grid, checked without torch.distributed."""

import itertools

import pytest

from megatron.core.parallel_state import build_layout, layout_groups
from megatron.core.rank_grid import RankGrid


def test_worked_example_default_order():
    """megatron-facts section 9: world 16, TP=2, CP=2, DP=2, PP=2."""
    g = RankGrid(tp=2, cp=2, dp=2, pp=2)
    assert g.groups("tp")[:3] == [[0, 1], [2, 3], [4, 5]]
    assert g.groups("cp")[:4] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert g.groups("dp")[:5] == [[0, 4], [1, 5], [2, 6], [3, 7], [8, 12]]
    assert g.groups("pp") == [[i, i + 8] for i in range(8)]
    assert g.groups("dp-cp") == [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]]
    assert g.groups("tp-pp")[0] == [0, 1, 8, 9]
    assert g.groups("tp-cp")[0] == [0, 1, 2, 3]
    assert g.groups("tp-dp-cp") == [list(range(8)), list(range(8, 16))]


def test_worked_example_tp_pp_dp_order():
    g = RankGrid(tp=2, cp=2, dp=2, pp=2, order="tp-cp-ep-pp-dp")
    assert g.groups("dp")[:2] == [[0, 8], [1, 9]]
    assert g.groups("pp")[:3] == [[0, 4], [1, 5], [2, 6]]
    assert [8, 12] in g.groups("pp")


def test_expert_grid_example():
    layout = build_layout(16, tensor_model_parallel_size=1, pipeline_model_parallel_size=2,
                          expert_model_parallel_size=4, expert_tensor_parallel_size=1)
    assert layout.expert.groups("ep")[:2] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert layout.expert.groups("pp")[0] == [0, 8]
    assert layout.expert.groups("pp") == layout.dense.groups("pp")


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


@pytest.mark.parametrize("world", [1, 2, 6, 8, 12, 64, 1024])
def test_groups_partition_the_world(world):
    """Every group kind partitions the ranks; formula rank = tp + cp*TP + dp*TP*CP + pp*TP*CP*DP."""
    sizes = _divisors(world)
    checked = 0
    for tp, pp, cp in itertools.product(sizes, sizes, [1, 2]):
        if world % (tp * pp * cp):
            continue
        layout = build_layout(world, tp, pp, cp)
        g = layout.dense
        for rank in range(0, world, max(1, world // 16)):
            c = g.coordinates(rank)
            assert rank == c["tp"] + c["cp"] * tp + c["dp"] * tp * cp + c["pp"] * tp * cp * g.dp
            assert g.rank_of(**c) == rank
        for name, groups in layout_groups(layout).items():
            if name in ("embd", "pos_embd"):
                continue
            flat = sorted(r for grp in groups for r in grp)
            assert flat == list(range(world)), name
        checked += 1
    assert checked > 0


def test_embedding_groups_are_first_and_last_stage():
    layout = build_layout(8, 1, 4)
    groups = layout_groups(layout)
    assert groups["embd"][0] == [0, 6] and groups["pos_embd"][0] == [0]
    assert groups["pp"][0] == [0, 2, 4, 6]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(world_size=6, tensor_model_parallel_size=4), "not divisible by tensor"),
        (dict(world_size=8, tensor_model_parallel_size=0), "--tensor-model-parallel-size must be a positive"),
        (dict(world_size=8, expert_model_parallel_size=3), "--expert-model-parallel-size"),
        (dict(world_size=8, order="tp-cp-dp-pp"), "invalid parallel order"),
    ],
)
def test_impossible_layouts_name_the_flag(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_layout(**kwargs)
