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

# advance_delayed (one launch) against advance_scales (torch) on a column of a [L, 3] history:
# the newest amax in, the window's scale (or the previous one where the window is 0, inf or
# NaN), the roll; amaxes that are 0, inf or NaN, and both window rules.
_ADVANCE_SCRIPT = textwrap.dedent("""
    import torch
    from megatron.core.fp8 import cast_triton
    from megatron.core.fp8.recipe import Fp8Recipe
    from megatron.core.fp8.scaling import advance_scales

    torch.manual_seed(0)
    special = [0.0, float("inf"), float("nan")]
    cases = 0
    for length in (1, 2, 5, 16):
        for algo in ("max", "most_recent"):
            for margin in (0, 2):
                for fmt_max in (448.0, 57344.0):
                    recipe = Fp8Recipe(fmt="hybrid", recipe="delayed", amax_history_len=length, margin=margin,
                                       amax_compute_algo=algo)
                    history = torch.rand(length, 3) * 10
                    scale = torch.rand(3) + 0.5
                    fast_history, fast_scale = history.clone(), scale.clone()
                    for step in range(8):
                        amax = torch.tensor(special[step % 3] if step % 4 == 3 else float(torch.rand(1)) * 7)
                        if step == 5:
                            history[length - 1, 1] = fast_history[length - 1, 1] = float("nan")
                        advance_scales(history[:, 1], scale[1], amax.clone(), recipe, fmt_max)
                        cast_triton.advance_delayed(fast_history[:, 1], fast_scale[1:2], amax.clone(), fmt_max,
                                                    margin, algo == "max")
                        same = lambda a, b: torch.equal(a.nan_to_num(-1.0), b.nan_to_num(-1.0))
                        assert same(fast_history, history), (length, algo, step, fast_history, history)
                        assert same(fast_scale, scale), (length, algo, step, fast_scale, scale)
                        cases += 1
    print("ok", cases)
""")


def _interpreted(script: str) -> str:
    repo = Path(__file__).resolve().parents[3]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(repo))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_delayed_cast_takes_the_amax_in_its_pass_and_moves_the_state_as_eager():
    assert _interpreted(_SCRIPT).endswith("ok")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_delayed_state_update_in_one_launch_equals_advance_scales():
    assert _interpreted(_ADVANCE_SCRIPT).endswith("ok 256")
