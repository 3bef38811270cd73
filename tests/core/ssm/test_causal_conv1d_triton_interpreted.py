"""The Triton causal conv1d kernels, run by Triton's CPU interpreter (TRITON_INTERPRET=1)
against the reference: forward and the x / weight / bias gradients, for contiguous inputs
and for a strided channel slice (the mixer's layout). Skipped where Triton
is not installed (the GPU tests in test_causal_conv1d_gpu.py cover the compiled kernels).

The interpreter must be chosen before the kernels are defined, so the check runs in a
child process. Tolerance: fp32 on both sides, summation order only (~1e-6)."""

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
    from megatron.core.ssm.causal_conv1d import causal_conv1d_reference
    from megatron.core.ssm.causal_conv1d_triton import causal_conv1d_triton
    for b, l, d, k, act, strided in [(2, 70, 96, 4, "silu", False), (1, 37, 130, 3, None, False),
                                     (3, 70, 96, 4, "silu", True)]:
        torch.manual_seed(0)
        if strided:  # the mixer's input: a channel slice of a [s, b, wider] tensor, batch first
            wide = torch.randn(l, b, d + 7, requires_grad=True)
            x = wide.transpose(0, 1)[..., 3:3 + d]
            x.retain_grad()
        else:
            x = torch.randn(b, l, d, requires_grad=True)
        w = (torch.randn(d, k) / k).requires_grad_()
        bias = torch.randn(d, requires_grad=True)
        out = causal_conv1d_triton(x, w, bias, act)
        g = torch.randn_like(out)
        out.backward(g)
        fast = [t.grad.clone() for t in (x, w, bias)]
        for t in (x, w, bias):
            t.grad = None
        ref = causal_conv1d_reference(x.transpose(1, 2), w, bias, act).transpose(1, 2)
        ref.backward(g)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        for got, t in zip(fast, (x, w, bias)):
            torch.testing.assert_close(got, t.grad, atol=1e-4, rtol=1e-5)
    print("ok")
""")


def test_kernels_match_reference_in_the_interpreter():
    repo = Path(__file__).resolve().parents[3]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(repo))
    done = subprocess.run([sys.executable, "-c", _CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
