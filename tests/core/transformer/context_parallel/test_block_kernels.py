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


def test_a_diagonal_block_splits_into_causal_and_full_pieces():
    plan = _plan(0, 2, 8, 0)  # chunks 0 and 3 of 4: (0,0) causal, (3,0) full, (3,3) causal
    assert plan.masked
    assert block_kernels.pieces(plan, True, None) == [([(0, 4)], [(0, 4)], True), ([(4, 4)], [(0, 4)], False),
                                                      ([(4, 4)], [(4, 4)], True)]
    unmasked = _plan(1, 2, 8, 0)
    assert not unmasked.masked and block_kernels.pieces(unmasked, True, None) == [(unmasked.rows, unmasked.cols, False)]
    assert block_kernels.pieces(_plan(0, 2, 8, 0, window=(2, 0)), True, (2, 0)) is None


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
