"""Process groups built on real gloo ranks match the pure rank arithmetic."""

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
