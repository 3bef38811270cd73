"""The Triton matrix-vector candidate of benchmarks/gemv_triton.py, run by Triton's CPU
interpreter (TRITON_INTERPRET=1, chosen before the kernel is defined: a child process)
against x W^T: shapes that are and are not multiples of the tiles, a row-major slice of a
wider matrix, and a refused column-major weight. Skipped where Triton is not installed."""

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
    from gemv_triton import gemv
    torch.manual_seed(0)
    for n, k, block_n, block_k in [(64, 256, 8, 128), (37, 300, 16, 128), (5, 70, 4, 64)]:
        w = torch.randn(n, k)
        x = torch.randn(1, k)
        torch.testing.assert_close(gemv(x, w, block_n=block_n, block_k=block_k), x @ w.t(), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(gemv(x[0], w, block_n=block_n, block_k=block_k), w @ x[0], atol=1e-4, rtol=1e-5)
    wide = torch.randn(20, 96)
    x = torch.randn(1, 64)
    torch.testing.assert_close(gemv(x, wide[:, 16:80], block_n=4, block_k=32), x @ wide[:, 16:80].t(), atol=1e-4, rtol=1e-5)
    try:
        gemv(x, torch.randn(64, 20).t())
    except ValueError as err:
        assert "row-major" in str(err)
    else:
        raise AssertionError("a column-major weight was taken")
    print("ok")
""")


def test_gemv_matches_the_product_in_the_interpreter():
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{repo / 'benchmarks'}{os.pathsep}{repo}")
    done = subprocess.run([sys.executable, "-c", _CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
