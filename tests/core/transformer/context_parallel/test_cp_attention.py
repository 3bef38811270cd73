"""Context-parallel attention equals one process, for every --cp-comm-type.

Each rank builds the same random q/k/v for the whole sequence, runs the reference
(DotProductAttention without CP, unfused fp32 math) on all of it, and runs the CP path
(DotProductAttention with a cp group: the dispatch under test) on its load-balanced
share (chunks i and 2CP-1-i). The CP output and the q/k/v gradients of this rank's
tokens must equal the reference rows.

Tolerance: fp32 throughout; the CP paths add the same products in another order (block
softmax merged by log-sum-exp, gradients summed over ring steps), which moves values of
order 1 by ~1e-6. 2e-5 absolute is far below any real error: a wrong mask, a block
merged twice or a gradient left on the wrong rank changes entries by > 1e-2
(test_wrong_chunk_order_is_caught shows the size for a mis-sliced sequence).
"""

import pytest
import torch

from tests.multirank import run_on_ranks

ATOL = 2e-5
S, B, HN = 16, 2, 8

# name -> (comm type, heads, groups, mask type, window, hierarchical sizes at CP=4)
CASES = {
    "causal": ("causal", 4, 4, None),
    "gqa": ("causal", 4, 2, None),
    "mqa": ("causal", 4, 1, None),
    "window": ("causal", 4, 2, (5, 0)),
    "bidirectional": ("no_mask", 4, 2, None),
    "bidirectional-window": ("no_mask", 4, 4, (3, 2)),
}
COMM_TYPES = ["p2p", "all_gather", "a2a", "a2a+p2p"]


def _config(np_, ng, window, comm_type, hierarchical):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=1, hidden_size=np_ * HN, num_attention_heads=np_, num_query_groups=ng,
        kv_channels=HN, attention_dropout=0.0, window_size=window, attention_backend="unfused",
        cp_comm_type=comm_type, hierarchical_context_parallel_sizes=hierarchical,
    )


def _case(rank, world, comm_type, mask_name, np_, ng, window, slicer):
    import torch.distributed as dist

    from megatron.core.process_groups import ProcessGroups
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    mask_type = AttnMaskType[mask_name]
    hierarchical = [2, world // 2] if comm_type == "a2a+p2p" else None
    config = _config(np_, ng, window, comm_type, hierarchical)
    seq = S * world // 2
    gen = torch.Generator().manual_seed(1234)
    q = torch.randn(seq, B, np_, HN, generator=gen)
    k = torch.randn(seq, B, ng, HN, generator=gen)
    v = torch.randn(seq, B, ng, HN, generator=gen)
    dout = torch.randn(seq, B, np_ * HN, generator=gen)

    ref = DotProductAttention(config, 1, mask_type, pg_collection=ProcessGroups())
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    out_ref = ref(qr, kr, vr)
    out_ref.backward(dout)

    cp = DotProductAttention(config, 1, mask_type, pg_collection=ProcessGroups(cp=dist.group.WORLD))
    ql, kl, vl = (slicer(t, rank, world).clone().requires_grad_() for t in (q, k, v))
    out = cp(ql, kl, vl)
    out.backward(slicer(dout, rank, world))
    from megatron.core.transformer.context_parallel.layout import slice_for_cp_rank

    def err(a, b_full):
        return (a - slice_for_cp_rank(b_full, 0, rank, world)).abs().max().item()

    return {"out": err(out, out_ref), "dq": err(ql.grad, qr.grad), "dk": err(kl.grad, kr.grad),
            "dv": err(vl.grad, vr.grad)}


def _balanced(t, rank, world):
    from megatron.core.transformer.context_parallel.layout import slice_for_cp_rank

    return slice_for_cp_rank(t, 0, rank, world)


def _contiguous(t, rank, world):
    return t.chunk(world, dim=0)[rank]


def _all_cases(rank, world):
    results = {}
    for comm_type in COMM_TYPES:
        for name, (mask_name, np_, ng, window) in CASES.items():
            results[(comm_type, name)] = _case(rank, world, comm_type, mask_name, np_, ng, window, _balanced)
    results["wrong-order"] = _case(rank, world, "p2p", "causal", 4, 2, None, _contiguous)
    from megatron.core.transformer.context_parallel import block_math

    # Query rows a few at a time (the long-sequence memory bound) must not change results.
    block_math.SCORE_ELEMENTS_PER_TILE = 3 * B * 4 * 2 * S
    results[("p2p", "row-tiles")] = _case(rank, world, "p2p", "causal", 4, 2, (5, 0), _balanced)
    results[("a2a+p2p", "row-tiles")] = _case(rank, world, "a2a+p2p", "causal", 4, 2, None, _balanced)
    # The ring's blocks on the flash kernels (block_kernels), which run on CUDA in half
    # precision only; their CPU form takes fp32, so the same comparison covers them here.
    from megatron.core.transformer.context_parallel import block_kernels

    block_kernels.supported = lambda q, dropout_p: dropout_p == 0.0
    for comm_type in ("p2p", "a2a+p2p"):
        for name, (mask_name, np_, ng, window) in CASES.items():
            results[(comm_type + " kernels", name)] = _case(rank, world, comm_type, mask_name, np_, ng, window,
                                                            _balanced)
    return results


@pytest.fixture(scope="module", params=[2, 4], ids=["cp2", "cp4"])
def cp_results(request):
    world = request.param
    return world, run_on_ranks(_all_cases, world, args=())


# "... kernels": the ring's blocks on the flash kernels (block_kernels).
@pytest.mark.parametrize("comm_type", COMM_TYPES + ["p2p kernels", "a2a+p2p kernels"])
@pytest.mark.parametrize("case", list(CASES))
def test_cp_attention_matches_one_process(cp_results, comm_type, case):
    world, per_rank = cp_results
    for rank, results in enumerate(per_rank):
        errors = results[(comm_type, case)]
        assert max(errors.values()) < ATOL, f"cp={world} rank {rank} {comm_type} {case}: {errors}"


@pytest.mark.parametrize("comm_type", ["p2p", "a2a+p2p"])
def test_row_tiled_blocks_match_one_process(cp_results, comm_type):
    world, per_rank = cp_results
    for rank, results in enumerate(per_rank):
        errors = results[(comm_type, "row-tiles")]
        assert max(errors.values()) < ATOL, f"cp={world} rank {rank} {comm_type} row tiles: {errors}"


def test_wrong_chunk_order_is_caught(cp_results):
    """Giving the attention contiguous chunks while it assumes the load-balanced order must fail."""
    _, per_rank = cp_results
    assert max(max(r["wrong-order"].values()) for r in per_rank) > 1e-2
