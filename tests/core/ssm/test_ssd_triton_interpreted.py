"""Our Triton SSD kernels, run by Triton's CPU interpreter (TRITON_INTERPRET=1), against the
chunked reference: y, the final state and the gradients of x, dt, A, B, C, D and the initial
state. Skipped where Triton is not installed (test_ssd_gpu.py covers the compiled kernels).

The interpreter must be chosen before the kernels are defined, so the check runs in a child
process. Shapes cover a length that is not a multiple of the chunk (padding), several chunks
and several tiles per chunk (block_q < chunk), one and several groups, the entering states
kept from forward or recomputed in backward, head and state dims
that are not powers of two (masked tiles), strided views of one projection (as the mixer
hands them over), and no D.

Tolerance: the reference runs in fp64, the kernels in fp32. The dt and A gradients gather
terms that cancel (each decay adds its share at one position and takes it at another), so
fp32 rounding leaves them ~1e-5 of their largest entry off (the fp32 reference is as far);
3e-5 of each tensor's largest entry passes that, and a wrong decay, a dropped term or a
mis-mapped group (errors of the order of the entries) cannot. bf16 inputs: the output and
dx are rounded to bf16 (step 2^-8), so 2e-2 there.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

_CHECK = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from megatron.core.ssm.ssd_reference import ssd_chunked
    from megatron.core.ssm.ssd_triton import ssd_triton

    def inputs(b, l, h, p, g, n, dtype, use_d, init):
        # One projection output, split into views: x, B and C are strided, as in the mixer.
        proj = torch.randn(b, l, h * p + 2 * g * n)
        x = proj[..., :h * p].reshape(b, l, h, p)
        B = (proj[..., h * p:h * p + g * n] / n ** 0.5).reshape(b, l, g, n)
        C = (proj[..., h * p + g * n:] / n ** 0.5).reshape(b, l, g, n)
        dt = F.softplus(torch.randn(b, l, h) - 1)
        A = -torch.rand(h) * 2 - 0.2
        D = torch.randn(h) if use_d else None
        s0 = torch.randn(b, h, p, n) if init else None
        x, B, C = (t.to(dtype).detach().requires_grad_() for t in (x, B, C))
        return [x, dt.requires_grad_(), A.requires_grad_(), B, C,
                None if D is None else D.requires_grad_(), None if s0 is None else s0.requires_grad_()]

    def loss_and_grads(y, final, weights, ins):
        loss = (y.float() * weights[0]).sum() + (final.float() * weights[1]).sum()
        leaves = [t for t in ins if t is not None]
        return torch.autograd.grad(loss, leaves)

    def check(b, l, h, p, g, n, chunk, block_q, dtype=torch.float32, use_d=True, init=False, keep_states=True):
        torch.manual_seed(0)
        ins = inputs(b, l, h, p, g, n, dtype, use_d, init)
        x, dt, A, B, C, D, s0 = ins
        y, final = ssd_triton(x, dt, A, B, C, chunk, D, s0, return_final_states=True, block_q=block_q,
                              keep_states=keep_states)
        weights = (torch.randn(y.shape), torch.randn(final.shape))
        got = loss_and_grads(y, final, weights, ins)
        wide = [None if t is None else t.double() for t in ins]
        y_ref, final_ref = ssd_chunked(*wide[:5], chunk, wide[5], wide[6], return_final_states=True)
        if dtype != torch.float32:
            y_ref = y_ref.to(dtype)
        want = loss_and_grads(y_ref, final_ref, weights, ins)
        tol = 3e-5 if dtype == torch.float32 else 2e-2
        names = [name for name, t in zip(["x", "dt", "A", "B", "C", "D", "s0"], ins) if t is not None]
        pairs = [("y", y, y_ref), ("final", final, final_ref)] + list(zip(names, got, want))
        for name, a, r in pairs:
            err = (a.float() - r.float()).abs().max().item()
            scale = r.float().abs().max().item()
            assert err <= tol * max(scale, 1.0), (b, l, h, p, g, n, chunk, dtype, name, err, scale)

    import megatron.core.ssm.ssd_triton as kernels
    # Tiny shapes: the backward programs take one head each (their dB / dC summed after).
    check(2, 70, 4, 16, 1, 32, chunk=32, block_q=16, init=True)   # padding, 3 chunks, 2 tiles per chunk
    check(1, 50, 6, 24, 3, 20, chunk=16, block_q=16)               # 3 groups, odd dims, 4 chunks
    check(1, 64, 2, 32, 2, 16, chunk=64, block_q=None, use_d=False)  # one full chunk, no D
    check(1, 40, 4, 16, 2, 16, chunk=16, block_q=16, dtype=torch.bfloat16)
    check(2, 70, 4, 16, 1, 32, chunk=32, block_q=16, init=True, keep_states=False)  # states recomputed in backward
    # Programs that walk a whole group (dB / dC stored summed, in B's dtype) or half of one.
    kernels._MIN_PROGRAMS = 0
    check(2, 70, 4, 16, 1, 32, chunk=32, block_q=16, init=True)
    check(1, 40, 4, 16, 2, 16, chunk=16, block_q=16, dtype=torch.bfloat16)
    kernels._heads_per_program = lambda shape, blocks: 2
    check(1, 50, 8, 16, 2, 16, chunk=16, block_q=16)
    print("ok")
""")


def test_kernels_match_reference_in_the_interpreter():
    repo = Path(__file__).resolve().parents[3]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(repo))
    done = subprocess.run([sys.executable, "-c", _CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
