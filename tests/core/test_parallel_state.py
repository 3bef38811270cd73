"""Process groups built on real gloo ranks match the pure rank arithmetic."""

import pytest
import torch
import torch.distributed as dist

from megatron.core import parallel_state
from tests.multirank import run_on_ranks


def _groups_on_rank(rank, world_size, tp, pp):
    groups = parallel_state.initialize_model_parallel(tp, pp)
    out = {}
    for name in ("tp", "pp", "dp", "dp_cp", "mp", "embd"):
        group = getattr(groups, name)
        if group is None:
            out[name] = None
            continue
        # collect the member ranks by an all-gather inside the group itself
        mine = torch.tensor([rank])
        members = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size(group))]
        dist.all_gather(members, mine, group=group)
        out[name] = [int(m) for m in members]
    out["tp_rank"] = parallel_state.get_tensor_model_parallel_rank()
    out["first"] = parallel_state.is_pipeline_first_stage()
    out["last"] = parallel_state.is_pipeline_last_stage()
    return out


def test_groups_match_rank_arithmetic():
    results = run_on_ranks(_groups_on_rank, 4, args=(2, 2))
    layout = parallel_state.build_layout(4, 2, 2)
    expected = parallel_state.layout_groups(layout)
    for rank, res in enumerate(results):
        for name in ("tp", "pp", "dp", "dp_cp", "mp"):
            assert res[name] == next(g for g in expected[name] if rank in g), (rank, name)
        assert res["tp_rank"] == rank % 2
        assert res["first"] == (rank < 2) and res["last"] == (rank >= 2)
        assert res["embd"] == [rank % 2, rank % 2 + 2]


def test_instance_groups_cut_each_data_parallel_group_into_consecutive_runs():
    """TP 2 x DP 4 on 8 ranks, 2 instances: dp_cp groups [0,2,4,6] and [1,3,5,7]."""
    layout = parallel_state.build_layout(8, 2)
    groups = parallel_state.instance_groups(layout, 2)
    assert groups["intra_dp_cp"] == [[0, 2], [4, 6], [1, 3], [5, 7]]
    assert groups["inter_dist_opt"] == [[0, 4], [2, 6], [1, 5], [3, 7]]
    # expert grid (ETP = TP 2, EP 1): the same cut
    assert groups["intra_expt_dp"] == groups["intra_dp_cp"]
    assert groups["inter_expt_dist_opt"] == groups["inter_dist_opt"]
    # EP 2 on 8 ranks (ETP 1): expert dp groups [0,2,4,6] ... cut the same way
    expert = parallel_state.instance_groups(parallel_state.build_layout(8, expert_model_parallel_size=2), 2)
    assert expert["intra_expt_dp"] == [[0, 2], [4, 6], [1, 3], [5, 7]]
    assert expert["intra_dp_cp"] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_instances_must_divide_both_data_parallel_sizes():
    with pytest.raises(ValueError, match="data x context parallel size 6 is not divisible"):
        parallel_state.instance_groups(parallel_state.build_layout(6), 4)
    with pytest.raises(ValueError, match="expert data-parallel size 1 is not divisible"):
        parallel_state.instance_groups(parallel_state.build_layout(4, expert_model_parallel_size=4), 2)


def _instance_groups_on_rank(rank, world_size):
    parallel_state.initialize_model_parallel(2)  # TP 2 x DP 2 on 4 ranks: one instance
    one = parallel_state.get_process_groups()
    assert one.intra_dp_cp is one.dp_cp and one.inter_dist_opt is None
    # The training application adds the instances later, before wrapping the model.
    groups = parallel_state.initialize_distributed_optimizer_instances(2)
    assert parallel_state.initialize_distributed_optimizer_instances(2) is groups
    out = {}
    for name in ("intra_dp_cp", "inter_dist_opt", "intra_expt_dp", "inter_expt_dist_opt"):
        members = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size(getattr(groups, name)))]
        dist.all_gather(members, torch.tensor([rank]), group=getattr(groups, name))
        out[name] = [int(m) for m in members]
    out["same_inter"] = groups.inter_dist_opt is groups.inter_expt_dist_opt
    out["partial"] = parallel_state.get_data_parallel_world_size(with_context_parallel=True, partial_data_parallel=True)
    return out


def test_instance_groups_on_real_ranks():
    results = run_on_ranks(_instance_groups_on_rank, 4)
    for rank, res in enumerate(results):
        assert res["intra_dp_cp"] == res["intra_expt_dp"] == [rank]
        assert res["inter_dist_opt"] == res["inter_expt_dist_opt"] == [rank % 2, rank % 2 + 2]
        assert res["same_inter"] and res["partial"] == 1
