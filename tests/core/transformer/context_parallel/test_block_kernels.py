"""Ring-attention blocks on the flash kernels (block_kernels) against the plain fp32 math
(block_math), one process: the pieces a block splits into, and forward / backward of a
masked diagonal block with grouped K/V. The kernels' CPU form runs here in fp32; the
results agree to float32 rounding (~1e-6), while a piece with the wrong causal flag or a
dropped piece moves entries by > 1e-2."""

import pytest
import torch

from megatron.core.transformer.context_parallel import block_kernels, block_math
from megatron.core.transformer.context_parallel.layout import local_segments

ATOL = 2e-5


def _plan(rank, cp, local_len, origin, causal=True, window=None):
    mine, theirs = local_segments(rank, cp, local_len), local_segments(origin, cp, local_len)
    return block_math.plan_block(mine, theirs, causal, window)


def test_a_rank_s_own_block_is_one_causal_call():
    plan = _plan(0, 2, 8, 0)  # chunks 0 and 3 of 4 against themselves: causal over [0, 3]
    assert plan.masked
    assert block_kernels.pieces(plan, True, None) == [([(0, 8)], [(0, 8)], True)]
    assert block_kernels.pieces(_plan(0, 2, 8, 0, window=(2, 0)), True, (2, 0)) is None


def test_a_peer_block_makes_one_unmasked_call_per_query_chunk():
    # rank 1 holds chunks 1 and 2 of 4, rank 0 chunks 0 and 3: chunks 1 and 2 see chunk 0
    # only (one call over the joined rows); rank 0's chunk 3 sees both of rank 1's, chunk 0 none.
    later = _plan(1, 2, 8, 0)
    assert block_kernels.pieces(later, True, None) == [([(0, 8)], [(0, 4)], False)]
    earlier = _plan(0, 2, 8, 1)
    assert not earlier.masked and block_kernels.pieces(earlier, True, None) == [([(4, 4)], [(0, 8)], False)]
    # CP 4, rank 2 (chunks 2 and 5 of 8) against rank 1 (chunks 1 and 6): chunk 2 sees 1,
    # chunk 5 sees 1 but not 6.
    mixed = _plan(2, 4, 8, 1)
    assert block_kernels.pieces(mixed, True, None) == [([(0, 8)], [(0, 4)], False)]
    # rank 1 (chunks 1 and 6) against rank 2 (chunks 2 and 5): chunk 6 sees both, chunk 1 none.
    assert block_kernels.pieces(_plan(1, 4, 8, 2), True, None) == [([(4, 4)], [(0, 8)], False)]


def test_kernels_are_chosen_for_cuda_half_precision_only():
    q = torch.zeros(1, 1, 1, 4, 64)
    assert not block_kernels.supported(q, 0.0)
    assert not block_kernels.supported(q.bfloat16(), 0.0)  # CPU


@pytest.mark.parametrize("groups", [1, 2])
def test_diagonal_block_forward_and_backward_equal_the_math(groups):
    torch.manual_seed(0)
    b, ng, hn, n = 2, groups, 8, 16
    g = 4 // groups
    q = torch.randn(b, ng, g, n, hn, requires_grad=True)
    k, v = (torch.randn(b, ng, 1, n, hn, requires_grad=True) for _ in range(2))
    plan, scale = _plan(0, 2, n, 0), hn ** -0.5
    mask = block_math.plan_mask(plan, True, None, q.device)
    out_ref, lse_ref = block_math.block_forward(q, k, v, scale, mask)

    out = torch.zeros(q.shape)
    lse = torch.full(q.shape[:-1], -float("inf"))
    with torch.no_grad():
        for rows, cols, causal in block_kernels.pieces(plan, True, None):
            o, l = block_kernels.forward(block_math.take(q, rows, 3), block_math.take(k, cols, 3),
                                         block_math.take(v, cols, 3), scale, causal)
            block_math.merge_into(out, lse, o, l, rows)
    torch.testing.assert_close(out, out_ref.detach(), atol=ATOL, rtol=0)
    torch.testing.assert_close(lse, lse_ref.detach(), atol=ATOL, rtol=0)

    dout = torch.randn(q.shape)
    delta = (dout * out).sum(-1)
    dq_ref, dk_ref, dv_ref = block_math.block_backward(q.detach(), k.detach(), v.detach(), dout, lse, delta, scale,
                                                       mask)
    dq, dk, dv = torch.zeros(q.shape), torch.zeros(k.shape), torch.zeros(v.shape)
    for rows, cols, causal in block_kernels.pieces(plan, True, None):
        take = block_math.take
        dq_p, dk_p, dv_p = block_kernels.backward(take(q.detach(), rows, 3), take(k.detach(), cols, 3),
                                                  take(v.detach(), cols, 3), take(out, rows, 3),
                                                  take(dout, rows, 3), take(lse, rows, 3), scale, causal)
        block_math.add_into(dq, rows, dq_p, 3)
        block_math.add_into(dk, cols, dk_p, 3)
        block_math.add_into(dv, cols, dv_p, 3)
    for got, want in ((dq, dq_ref), (dk, dk_ref), (dv, dv_ref)):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_a_block_with_a_shared_chunk_splits_into_a_causal_and_an_unmasked_call():
    # queries at [0, 4) and [8, 12), keys at [4, 8) and [8, 12): the second query chunk
    # sees the first key chunk whole and the second causally; the first sees nothing.
    plan = block_math.plan_block([(0, 4), (8, 4)], [(4, 4), (8, 4)], True, None)
    assert plan.rows == [(4, 4)] and plan.masked
    assert block_kernels.pieces(plan, True, None) == [([(4, 4)], [(4, 4)], True), ([(4, 4)], [(0, 4)], False)]


@pytest.mark.parametrize("first_rows_empty", [False, True])
def test_the_compiled_merge_equals_the_eager_one(first_rows_empty):
    from megatron.core.fusions.compiled_region import force_compiled_on_cpu

    torch.manual_seed(0)
    out = torch.randn(2, 2, 2, 8, 16)
    lse = torch.randn(2, 2, 2, 8)
    if first_rows_empty:  # rows no earlier block reached: lse -inf, out 0
        out[..., :3, :], lse[..., :3] = 0.0, -float("inf")
    o_blk, l_blk = torch.randn(2, 2, 2, 6, 16).bfloat16(), torch.randn(2, 2, 2, 6)
    rows = [(0, 4), (6, 2)]
    want_out, want_lse = out.clone(), lse.clone()
    block_math.merge_into(want_out, want_lse, o_blk, l_blk, rows)
    with force_compiled_on_cpu("inductor"):
        block_math.merge_into(out, lse, o_blk, l_blk, rows)
    torch.testing.assert_close(out, want_out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, want_lse, atol=1e-6, rtol=1e-6)
    assert torch.isfinite(out).all()


def test_the_first_result_over_every_row_becomes_the_accumulator():
    o, l = torch.randn(1, 1, 2, 8, 4), torch.randn(1, 1, 2, 8)
    out, lse = block_math.accumulate(None, None, o, l, [(0, 8)], 8)
    assert out is o and lse is l
    out, lse = block_math.accumulate(None, None, o[..., :4, :], l[..., :4], [(4, 4)], 8)
    torch.testing.assert_close(out[..., 4:, :], o[..., :4, :])
    assert (out[..., :4, :] == 0).all() and torch.isinf(lse[..., :4]).all()
