"""The delayed-scaling cast (one Triton pass that casts with the state's scale and takes the
amax) against the eager path, in Triton's CPU interpreter (TRITON_INTERPRET=1, chosen before
the kernels are defined: a child process).

The interpreter's FP8 conversion rounds some values just below a power of two down a binade
(the GPU does not; ``test_fp8_gpu.py`` compares bits there), so the inputs here are FP8 grid
values and the scales powers of two: every product is exact and the bits must match. Inputs
far beyond the format's range check the saturation. Skipped where Triton is not installed."""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

_SCRIPT = textwrap.dedent("""
    import torch
    import megatron.core.fp8.scaling as scaling
    from megatron.core.fp8 import cast_triton
    from megatron.core.fp8.recipe import Fp8Recipe
    from megatron.core.fp8.scaling import Fp8Scaling

    torch.manual_seed(0)

    def grid_values(rows, cols, dtype):
        # FP8 grid values (finite), so x * a power-of-two scale is exact
        bits = torch.randint(0, 256, (rows, cols), dtype=torch.uint8).view(dtype).float()
        return torch.where(torch.isfinite(bits), bits, torch.zeros_like(bits))

    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        x = grid_values(70, 45, dtype) / 2
        x[3, 7] = 1e9  # saturates
        state = torch.tensor([1.0, 2.0, 1.0])
        q, q_t, scale, scale_inv, amax = cast_triton.cast_delayed_scaling(x, state[1:2], dtype, True)
        eager = scaling.quantize(x, torch.tensor(2.0), dtype).view(torch.uint8)
        assert torch.equal(q.view(torch.uint8), eager), dtype
        assert torch.equal(q_t.view(torch.uint8), eager.t().contiguous()), dtype
        assert amax.item() == x.abs().max().item() == 1e9
        assert scale.item() == 2.0 and scale_inv.item() == 0.5 and torch.equal(state, torch.tensor([1.0, 2.0, 1.0]))
        q2, q2_t, *_ = cast_triton.cast_delayed_scaling(x, state[1:2], dtype, False)
        assert q2_t is None and torch.equal(q2.view(torch.uint8), eager)
        x[69, 44] = float("nan")
        assert torch.isnan(cast_triton.cast_delayed_scaling(x, state[1:2], dtype, False)[4])

    # The delayed recipe through Fp8Scaling: the one-pass path moves the state exactly as the
    # eager path (amax, then scale_for, then the cast) does, call after call; both casts are
    # the interpreter's, so they round alike.
    recipe = Fp8Recipe(fmt="hybrid", recipe="delayed", amax_history_len=3, margin=1)
    fast, ref = Fp8Scaling(recipe), Fp8Scaling(recipe)
    fast.scale.fill_(0.5)
    ref.scale.fill_(0.5)
    for step in range(4):
        x = grid_values(33, 20, torch.float8_e4m3fn) * 2 ** (step - 6)
        scaling._use_triton = lambda t: True
        got = fast.quantize_operand(x, 0, transpose=True)
        scaling._use_triton = lambda t: False
        scale = ref.scale_for(x, 0)
        q, q_t = cast_triton.cast(x, scale, torch.float8_e4m3fn, transpose=True)
        assert torch.equal(got.q.view(torch.uint8), q.view(torch.uint8))
        assert torch.equal(got.q_t.view(torch.uint8), q_t.view(torch.uint8))
        assert got.scale.item() == scale.item() and got.scale_inv.item() == scale.reciprocal().item()
        assert torch.equal(fast.amax_history, ref.amax_history) and torch.equal(fast.scale, ref.scale)
    assert fast.scale[0] != 0.5  # the state moved on
    print("ok")
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_delayed_cast_takes_the_amax_in_its_pass_and_moves_the_state_as_eager():
    repo = Path(__file__).resolve().parents[3]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(repo))
    done = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
