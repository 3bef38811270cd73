"""The ring's kernel blocks on CUDA (bf16; cuDNN and flash) against the plain fp32 math: a diagonal
block of the load-balanced split (causal and full pieces) with grouped K/V, forward and
backward. Tolerance: bf16 inputs and outputs (step 2^-8 near 1), so 3e-2 absolute on
entries of order 1; a wrong causal flag or a dropped piece is off by more than 0.1."""

import pytest
import torch

from megatron.core.transformer.context_parallel import block_kernels, block_math
from megatron.core.transformer.context_parallel.layout import local_segments

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("backend", ["cudnn", "flash"])
@pytest.mark.parametrize("origin", [0, 1], ids=["off-diagonal", "diagonal"])
def test_bf16_kernel_blocks_equal_fp32_math(origin, backend):
    if backend == "cudnn" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the ring takes cuDNN's kernel on Hopper and newer")
    torch.manual_seed(0)
    b, ng, g, n, hn = 2, 2, 4, 256, 128
    q = torch.randn(b, ng, g, n, hn, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(b, ng, 1, n, hn, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    plan = block_math.plan_block(local_segments(1, 2, n), local_segments(origin, 2, n), True, None)
    scale = hn ** -0.5
    assert block_kernels.supported(q, 0.0)
    mask = block_math.plan_mask(plan, True, None, q.device)
    q32, k32, v32 = (block_math.take(t.float(), spans, 3) for t, spans in ((q, plan.rows), (k, plan.cols), (v, plan.cols)))
    out_ref, lse_ref = block_math.block_forward(q32, k32, v32, scale, mask)

    out = torch.zeros(q.shape, device="cuda")
    lse = torch.full(q.shape[:-1], -float("inf"), device="cuda")
    pieces = block_kernels.pieces(plan, True, None)
    for rows, cols, causal in pieces:
        o, l = block_kernels.forward(block_math.take(q, rows, 3), block_math.take(k, cols, 3),
                                     block_math.take(v, cols, 3), scale, causal, backend)
        block_math.merge_into(out, lse, o.float(), l, rows)
    out_rows, lse_rows = block_math.take(out, plan.rows, 3), block_math.take(lse, plan.rows, 3)
    torch.testing.assert_close(out_rows, out_ref, atol=3e-2, rtol=0)
    torch.testing.assert_close(lse_rows, lse_ref, atol=1e-3, rtol=1e-3)

    dout = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)
    out_bf16 = out.to(torch.bfloat16)
    do_rows = block_math.take(dout.float(), plan.rows, 3)
    delta = (do_rows * block_math.take(out_bf16.float(), plan.rows, 3)).sum(-1)
    dq_ref, dk_ref, dv_ref = block_math.block_backward(q32, k32, v32, do_rows, lse_rows, delta, scale, mask)
    dq, dk, dv = torch.zeros(q.shape, device="cuda"), torch.zeros(k.shape, device="cuda"), torch.zeros(v.shape, device="cuda")
    take = block_math.take
    for rows, cols, causal in pieces:
        dq_p, dk_p, dv_p = block_kernels.backward(take(q, rows, 3), take(k, cols, 3), take(v, cols, 3),
                                                  take(out_bf16, rows, 3), take(dout, rows, 3), take(lse, rows, 3),
                                                  scale, causal, backend)
        block_math.add_into(dq, rows, dq_p.float(), 3)
        block_math.add_into(dk, cols, dk_p, 3)
        block_math.add_into(dv, cols, dv_p, 3)
    torch.testing.assert_close(take(dq, plan.rows, 3), dq_ref, atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(take(dk, plan.cols, 3), dk_ref, atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(take(dv, plan.cols, 3), dv_ref, atol=5e-2, rtol=2e-2)
