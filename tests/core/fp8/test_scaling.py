"""FP8 scaling math against hand computations: scale = (fp8_max / amax) / 2^margin, the
delayed-scaling amax history (most_recent / max), current (tensorwise) scaling, the
formats per tensor role, and the config's refusals."""

import pytest
import torch

from megatron.core.fp8.recipe import GRAD_OUTPUT, INPUT, WEIGHT, Fp8Recipe
from megatron.core.fp8.scaling import Fp8Scaling, compute_scale, dequantize, quantize
from megatron.core.transformer.transformer_config import TransformerConfig

E4M3_MAX, E5M2_MAX = 448.0, 57344.0


def _const(value, n=4):
    return torch.full((n,), float(value))


def test_compute_scale_by_hand():
    prev = torch.tensor(7.0)
    assert compute_scale(torch.tensor(2.0), E4M3_MAX, 0, prev).item() == 224.0
    assert compute_scale(torch.tensor(2.0), E4M3_MAX, 3, prev).item() == 28.0  # 224 / 2^3
    assert compute_scale(torch.tensor(0.0), E4M3_MAX, 0, prev).item() == 7.0  # nothing to scale: keep
    assert compute_scale(torch.tensor(float("inf")), E4M3_MAX, 0, prev).item() == 7.0
    assert compute_scale(torch.tensor(float("nan")), E4M3_MAX, 0, prev).item() == 7.0


def test_formats_per_role():
    hybrid, e4m3 = Fp8Recipe(fmt="hybrid"), Fp8Recipe(fmt="e4m3")
    assert hybrid.dtype(INPUT) == hybrid.dtype(WEIGHT) == torch.float8_e4m3fn
    assert hybrid.dtype(GRAD_OUTPUT) == torch.float8_e5m2
    assert e4m3.dtype(GRAD_OUTPUT) == torch.float8_e4m3fn


def test_delayed_most_recent_uses_the_previous_calls_amax():
    state = Fp8Scaling(Fp8Recipe(recipe="delayed", amax_history_len=1))
    # first call: the initial scale 1; its amax 2 sets the next scale to 448 / 2
    assert state.scale_for(_const(2.0), INPUT).item() == 1.0
    assert state.scale_for(_const(8.0), INPUT).item() == 224.0
    assert state.scale_for(_const(1.0), INPUT).item() == 56.0  # 448 / 8
    assert state.scale[INPUT].item() == 448.0
    assert state.scale[WEIGHT].item() == 1.0  # other slots untouched


def test_delayed_max_over_the_history_window():
    state = Fp8Scaling(Fp8Recipe(recipe="delayed", amax_history_len=3, amax_compute_algo="max", margin=1))
    used = [state.scale_for(_const(a), WEIGHT).item() for a in (4.0, 1.0, 2.0, 1.0, 1.0)]
    # after call k the scale is 448 / max(amax of calls k-2..k) / 2
    assert used == [1.0, 448 / 4 / 2, 448 / 4 / 2, 448 / 4 / 2, 448 / 2 / 2]
    assert state.scale[WEIGHT].item() == 448 / 2 / 2  # window: the amaxes of calls 3-5 (2, 1, 1)
    assert state.amax_history[:, WEIGHT].tolist() == [0.0, 1.0, 1.0]


def test_delayed_most_recent_ignores_older_history():
    state = Fp8Scaling(Fp8Recipe(recipe="delayed", amax_history_len=4, amax_compute_algo="most_recent"))
    for a in (16.0, 1.0):
        state.scale_for(_const(a), INPUT)
    assert state.scale[INPUT].item() == 448.0


def test_tensorwise_uses_the_tensors_own_amax_and_grad_format():
    state = Fp8Scaling(Fp8Recipe(recipe="tensorwise", fmt="hybrid", margin=2))
    assert state.scale_for(_const(-7.0), INPUT).item() == pytest.approx(448 / 7 / 4, rel=1e-6)  # float32
    assert state.scale_for(_const(3.0), GRAD_OUTPUT).item() == pytest.approx(E5M2_MAX / 3 / 4, rel=1e-6)
    assert state.scale_for(torch.zeros(3), INPUT).item() == 1.0


def test_quantize_saturates_and_round_trips():
    x = torch.tensor([1.0, -3.0, 1000.0, 0.1])
    scale = torch.tensor(2.0)
    q = quantize(x, scale, torch.float8_e4m3fn)
    assert q.dtype == torch.float8_e4m3fn
    # 2000 saturates to 448 (a plain cast would give NaN: e4m3fn has no infinity)
    assert q.float().tolist()[:3] == [2.0, -6.0, 448.0]
    back = dequantize(q, scale)
    assert back[2].item() == 224.0
    assert torch.equal(back, (x * 2).clamp(-448, 448).to(torch.float8_e4m3fn).float() * 0.5)


def _config(**kw):
    base = dict(num_layers=4, hidden_size=32, num_attention_heads=4, fp8="hybrid")
    base.update(kw)
    return TransformerConfig(**base)


@pytest.mark.parametrize("kw, message", [
    (dict(fp8_recipe="mxfp8"), "--fp8-recipe mxfp8 is not supported: MXFP8 needs Blackwell"),
    (dict(fp8_recipe="blockwise"), "--fp8-recipe blockwise is not supported"),
    (dict(fp8="e5m2"), "--fp8-format must be one of"),
    (dict(fp8_amax_compute_algo="mean"), "--fp8-amax-compute-algo must be"),
    (dict(fp8_amax_history_len=0), "--fp8-amax-history-len must be a positive"),
    (dict(fp8_margin=-1), "--fp8-margin must be"),
    (dict(first_last_layers_bf16=True, num_layers_at_start_in_bf16=3, num_layers_at_end_in_bf16=2),
     "exceed --num-layers 4"),
])
def test_config_refusals(kw, message):
    with pytest.raises(ValueError, match=message):
        _config(**kw)


def test_config_accepts_the_hopper_recipes():
    _config(fp8_recipe="tensorwise", fp8="e4m3")
    _config(fp8_recipe="delayed", fp8_amax_history_len=16, fp8_amax_compute_algo="max")
    # the recompute reuses the forward's scales (fp8.recompute_replay)
    _config(fp8_recipe="delayed", recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    _config(fp8=None, fp8_recipe="mxfp8")  # recipe flags are inert without --fp8-format, as in Megatron


def test_scaling_state_stays_float32_in_a_bf16_model():
    """--bf16 moves the model with ``.to(torch.bfloat16)``: the scaling buffers stay float32,
    so a delayed-scaling linear hands torch._scaled_mm float32 scales (it refuses others;
    checked where this torch has a CPU kernel for it)."""
    from megatron.core.fp8.gemm import SCALED_MM
    from megatron.core.fp8.linear import fp8_linear

    model = torch.nn.Module()
    model.fp8 = Fp8Scaling(Fp8Recipe(recipe="delayed", amax_history_len=2))
    model.to(torch.bfloat16)
    assert model.fp8.scale.dtype == model.fp8.amax_history.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in model.state_dict().values())
    x = torch.randn(16, 32, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(16, 32, dtype=torch.bfloat16, requires_grad=True)
    try:
        out = fp8_linear(x, w, model.fp8, backend=SCALED_MM)
    except NotImplementedError:
        pytest.skip("this torch has no CPU torch._scaled_mm")
    out.sum().backward()
    assert out.dtype == torch.bfloat16 and w.grad is not None
