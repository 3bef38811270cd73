"""FP8 in the MoE experts, on CPU through the fp32 emulation: the per-expert loop
(SequentialMLP) and the grouped path (GroupedMLP, whose emulation runs the GEMMs per
expert) against quantize-dequantize reference math per expert, exactly; each expert's
own delayed-scaling state; --no-fp8-wgrad; the grouped path equal to the loop bit for
bit (outputs, gradients, scaling state); the padded row layout of the GPU kernels."""

import pytest
import torch

from megatron.core.fp8.grouped_gemm import row_layout, to_layout
from megatron.core.fp8.layer_scope import fp8_layer_scope
from megatron.core.fp8.scaling import Fp8Scaling, fp8_max
from megatron.core.transformer.moe.experts import GroupedMLP, SequentialMLP
from tests.core.transformer.moe.moe_cases import moe_config

E4M3 = torch.float8_e4m3fn
COUNTS = [5, 0, 9, 4]  # expert 1 gets no tokens
ROWS, HIDDEN = sum(COUNTS), 16


def _config(**fp8):
    kw = dict(fp8="hybrid", fp8_recipe="tensorwise", fp8_emulation=True)
    kw.update(fp8)
    return moe_config(**kw)


def _experts(cls, config):
    with fp8_layer_scope(config, 1):
        module = cls(config, 1, range(len(COUNTS)))
    assert module.local_experts[0].linear_fc1.fp8 is not None
    return module


def _pair(config):
    loop, grouped = _experts(SequentialMLP, config), _experts(GroupedMLP, config)
    grouped.load_state_dict(loop.state_dict())
    return loop, grouped


def _data(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(ROWS, HIDDEN, generator=gen) * 3
    return x, torch.randn(ROWS, HIDDEN, generator=gen) * 1e-2


def _run(module, x, dy):
    x = x.clone().requires_grad_()
    out = module(x, torch.tensor(COUNTS))
    out.backward(dy)
    grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    return [out.detach(), x.grad] + grads


def _qdq(t, dtype):
    """Current-scaling quantize-dequantize: scale = fp8_max / amax (1 for an empty t)."""
    if t.numel() == 0:
        return t.float()
    scale = torch.tensor(fp8_max(dtype)) / t.abs().amax().float()
    q = (t.float() * scale).clamp(-fp8_max(dtype), fp8_max(dtype)).to(dtype)
    return q.float() * scale.reciprocal()


def _transposed_layout(w):
    """w itself, stored transposed as the input-gradient GEMM reads the FP8 weight: the
    fp32 BLAS may sum in another order for another layout, and the comparison is exact."""
    return w.t().contiguous().t()


def _reference_expert(expert, x, dy, grad_dtype, fp8_wgrad=True):
    """One expert's fc1 -> activation -> fc2 with every GEMM on quantize-dequantized
    operands (the activation's backward by autograd, in fp32)."""
    w1, w2 = expert.linear_fc1.weight.detach(), expert.linear_fc2.weight.detach()
    xq, w1q, w2q = _qdq(x, E4M3), _qdq(w1, E4M3), _qdq(w2, E4M3)
    pre = (xq @ w1q.t()).requires_grad_()
    h = expert.activate(pre)
    hq = _qdq(h.detach(), E4M3)
    y = hq @ w2q.t()
    dyq = _qdq(dy, grad_dtype)
    dh = dyq @ _transposed_layout(w2q)
    (dpre,) = torch.autograd.grad(h, pre, dh)
    dpreq = _qdq(dpre, grad_dtype)
    dx = dpreq @ _transposed_layout(w1q)
    if fp8_wgrad:
        dw1, dw2 = dpreq.t() @ xq, dyq.t() @ hq
    else:
        dw1, dw2 = dpre.t() @ x, dy.t() @ h.detach()
    return y, dx, dw1, dw2, h.detach()


def _reference(module, x, dy, grad_dtype, fp8_wgrad=True):
    outs, dxs, wgrads = [], [], []
    for expert, xe, dye in zip(module.local_experts, x.split(COUNTS), dy.split(COUNTS)):
        y, dx, dw1, dw2, _ = _reference_expert(expert, xe, dye, grad_dtype, fp8_wgrad)
        outs.append(y)
        dxs.append(dx)
        wgrads.append((dw1, dw2))
    return torch.cat(outs), torch.cat(dxs), wgrads


@pytest.mark.parametrize("cls", [SequentialMLP, GroupedMLP])
@pytest.mark.parametrize("fmt", ["hybrid", "e4m3"])
def test_emulated_experts_equal_reference_math_per_expert(cls, fmt):
    config = _config(fp8=fmt)
    module = _experts(cls, config)
    x, dy = _data(0)
    out, dx, *grads = _run(module, x, dy)
    ref_out, ref_dx, ref_wgrads = _reference(module, x, dy, config_grad_dtype(fmt))
    assert torch.equal(out, ref_out)
    assert torch.equal(dx, ref_dx)
    names = [n for n, _ in module.named_parameters()]
    for e, (dw1, dw2) in enumerate(ref_wgrads):
        assert torch.equal(grads[names.index(f"local_experts.{e}.linear_fc1.weight")], dw1), e
        assert torch.equal(grads[names.index(f"local_experts.{e}.linear_fc2.weight")], dw2), e
    # FP8 is not a no-op: the expert output differs from the exact fp32 one
    exact = torch.cat([m(xe) for m, xe in zip(_plain_experts(module), x.split(COUNTS))])
    assert not torch.equal(out, exact.detach())
    # e4m3 keeps 3 mantissa bits: a few percent of error per GEMM, by norm
    assert (out - exact.detach()).norm() < 0.1 * exact.norm()


def config_grad_dtype(fmt):
    return torch.float8_e5m2 if fmt == "hybrid" else E4M3


def _plain_experts(module):
    """The same experts computing in plain fp32 (their FP8 state detached)."""
    plain = _experts(SequentialMLP, _config())
    plain.load_state_dict(module.state_dict())
    for expert in plain.local_experts:
        expert.linear_fc1.fp8 = expert.linear_fc2.fp8 = None
    return plain.local_experts


@pytest.mark.parametrize("cls", [SequentialMLP, GroupedMLP])
def test_each_expert_keeps_its_own_delayed_amax_history(cls):
    """Delayed scaling, history 2, max: after two calls every expert's fc1 history holds its
    own input and weight amaxes and fc2's its own output-gradient amax; the input scale is
    448 over the larger input amax of the two calls. The idle expert records 0 and keeps
    scale 1. One scale shared by the experts would fail every per-expert comparison."""
    module = _experts(cls, _config(fp8_recipe="delayed", fp8_amax_history_len=2, fp8_amax_compute_algo="max"))
    calls = [_data(1), _data(2)]
    for x, dy in calls:
        _run(module, x, dy)
    for e, expert in enumerate(module.local_experts):
        fc1, fc2 = expert.linear_fc1.fp8, expert.linear_fc2.fp8
        x_amax = [x.split(COUNTS)[e].abs().amax().item() if COUNTS[e] else 0.0 for x, _ in calls]
        dy_amax = [dy.split(COUNTS)[e].abs().amax().item() if COUNTS[e] else 0.0 for _, dy in calls]
        assert not fc1.amax_history[0].any()  # cleared for the next call
        assert fc1.amax_history[1, 0].item() == pytest.approx(x_amax[1], rel=1e-6), e
        assert fc1.amax_history[1, 1].item() == pytest.approx(expert.linear_fc1.weight.abs().max().item()), e
        assert fc2.amax_history[1, 2].item() == pytest.approx(dy_amax[1], rel=1e-6), e
        expected_scale = 448 / max(x_amax) if COUNTS[e] else 1.0
        assert fc1.scale[0].item() == pytest.approx(expected_scale, rel=1e-6), e


@pytest.mark.parametrize("cls", [SequentialMLP, GroupedMLP])
def test_no_fp8_wgrad_keeps_the_expert_weight_gradients_in_high_precision(cls):
    module = _experts(cls, _config(fp8_wgrad=False))
    x, dy = _data(3)
    _, dx, *grads = _run(module, x, dy)
    _, ref_dx, _ = _reference(module, x, dy, torch.float8_e5m2, fp8_wgrad=False)
    assert torch.equal(dx, ref_dx)
    names = [n for n, _ in module.named_parameters()]
    for e, (expert, xe, dye) in enumerate(zip(module.local_experts, x.split(COUNTS), dy.split(COUNTS))):
        _, _, _, dw2, h = _reference_expert(expert, xe, dye, torch.float8_e5m2, fp8_wgrad=False)
        assert torch.equal(grads[names.index(f"local_experts.{e}.linear_fc2.weight")], dye.t() @ h), e


@pytest.mark.parametrize("fmt", ["hybrid", "e4m3"])
def test_grouped_path_equals_the_loop_bit_for_bit(fmt):
    """Three delayed-scaling steps: outputs, gradients and every expert's scaling state
    agree exactly, so a checkpoint saved with either path resumes on the other."""
    loop, grouped = _pair(_config(fp8=fmt, fp8_recipe="delayed", fp8_amax_history_len=3,
                                  fp8_amax_compute_algo="max"))
    for step in range(3):
        x, dy = _data(10 + step)
        for a, b in zip(_run(loop, x, dy), _run(grouped, x, dy)):
            assert torch.equal(a, b), step
    state, grouped_state = loop.state_dict(), grouped.state_dict()
    assert any(k.endswith("fp8.amax_history") for k in state)
    for key, value in state.items():
        assert torch.equal(value, grouped_state[key]), key
    assert sum(isinstance(m, Fp8Scaling) for m in grouped.modules()) == 2 * len(COUNTS)


def test_padded_row_layout_of_the_gpu_kernels():
    """Groups start at multiples of 16 rows; each given row lands in its group, in order,
    and the padding is zero (it adds nothing to a weight gradient)."""
    counts = torch.tensor([3, 0, 17, 16])
    rows = row_layout(counts, 36, padded=True)
    assert rows.rows == 96 and rows.offsets.dtype == torch.int32  # 36 + 4 * 15 rounded up to 16
    assert rows.offsets.tolist() == [16, 16, 48, 64]
    assert rows.slot.tolist() == list(range(0, 3)) + list(range(16, 33)) + list(range(48, 64))
    assert rows.row_group.tolist() == [0] * 3 + [2] * 17 + [3] * 16
    x = (torch.arange(36, dtype=torch.float32)[:, None] % 7 + 1).expand(36, 2).to(E4M3)  # exact in e4m3
    laid = to_layout(x, rows).float()
    assert torch.equal(laid[rows.slot], x.float()) and laid.sum().item() == x.float().sum().item()
    plain = row_layout(counts, 36, padded=False)
    assert plain.slot is None and plain.offsets.tolist() == [3, 3, 20, 36]


def _meta(t):
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def _scaled_grouped_mm_on_cpu(a, b, scale_a, scale_b, offs=None, out_dtype=None, check_out=True):
    """torch._scaled_grouped_mm for the CPU, which has no kernel for it: the operands are
    first checked by its meta function (FP8 e4m3 only, first operand row-major, second
    column-major, the scales' shapes), then multiplied in fp32 with the scales applied,
    the result rounded to bf16 as the kernel's output. A group without rows is left
    unwritten (NaN here), as some kernels leave it."""
    torch.ops.aten._scaled_grouped_mm(_meta(a), _meta(b), _meta(scale_a), _meta(scale_b), offs=_meta(offs),
                                      out_dtype=out_dtype if check_out else torch.bfloat16)
    if b.dim() == 3:  # rows of a grouped, b [G, K, N]: scale_a per row, scale_b [G, N]
        out = torch.ops.aten._grouped_mm(a.float() * scale_a[:, None], b.float() * scale_b[:, None, :], offs=offs)
    else:  # contraction over grouped rows: scale_a [G * M], scale_b [G * N], group-major
        groups = offs.numel()
        out = torch.ops.aten._grouped_mm(a.float(), b.float(), offs=offs)
        out = out * scale_a.view(groups, -1, 1) * scale_b.view(groups, 1, -1)
        empty = torch.diff(offs, prepend=offs.new_zeros(1)) == 0
        out = torch.where(empty[:, None, None], float("nan"), out)
    return out.to(out_dtype)


def _fp32_outputs(grouped_mm):
    """A grouped GEMM (the real one, or the stand-in) checked as it is called, computing on
    in fp32 and returning fp32: the kernels' bf16 outputs left out, so that only the
    layouts and scales are compared against the emulation."""
    def call(a, b, *scales, offs=None, out_dtype=None):
        if scales:
            return _scaled_grouped_mm_on_cpu(a, b, *scales, offs=offs, out_dtype=torch.float32, check_out=False)
        torch.ops.aten._grouped_mm(_meta(a), _meta(b), offs=_meta(offs))
        return grouped_mm(a.float(), b.float(), offs=offs)
    return call


@pytest.mark.parametrize("fmt", ["hybrid", "e4m3"])
def test_grouped_kernel_path_layouts_and_no_host_reads(fmt, monkeypatch):
    """The Hopper path on CPU, in fp32: torch._scaled_grouped_mm and torch._grouped_mm
    (the e5m2 GEMMs of the hybrid backward) checked by their meta
    functions (FP8 e4m3 or bf16 operands as each takes, layouts, scale shapes) and run in
    fp32. Rows padded to 16 per expert, per-expert scales expanded to per-row / per-column
    ones, padding removed: the results and the scaling state equal the emulated loop's up
    to fp32 summation order (measured 2e-7 of the norm), which may rarely move a value
    across an FP8 step (bound 1e-2; a misplaced group, row or scale is off by order 1),
    and no tensor value is read on the host (the dispatch stays asynchronous)."""
    from megatron.core.fp8 import grouped_gemm
    from megatron.core.fp8.gemm import SCALED_MM
    from megatron.core.transformer.moe import experts as experts_module
    from tests.core.transformer.moe.moe_cases import forbid_host_reads

    # tensorwise: every expert's scales differ from the first call (delayed starts at 1)
    loop, grouped = _pair(_config(fp8=fmt))
    x, dy = _data(20)
    expected = _run(loop, x, dy)
    monkeypatch.setattr(experts_module, "select_backend", lambda device, emulation: SCALED_MM)
    monkeypatch.setattr(grouped_gemm, "grouped_kernel_fits", lambda device, *dims: True)
    monkeypatch.setattr(torch, "_scaled_grouped_mm", _fp32_outputs(None))
    monkeypatch.setattr(torch, "_grouped_mm", _fp32_outputs(torch._grouped_mm))
    counts = torch.tensor(COUNTS)
    xi = x.clone().requires_grad_()
    with monkeypatch.context() as guarded:
        forbid_host_reads(guarded)
        out = grouped(xi, counts)
        out.backward(dy)
    actual = [out.detach(), xi.grad] + [p.grad for p in grouped.parameters()]
    for i, (a, b) in enumerate(zip(actual, expected)):
        assert (a - b).norm() <= 1e-2 * b.norm(), i
    for (key, a), b in zip(grouped.state_dict().items(), loop.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=0, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("a_dtype", [E4M3, torch.float8_e5m2])
def test_grouped_kernel_gemms_equal_the_per_expert_loop(a_dtype, monkeypatch):
    """grouped_nt and grouped_tn through the kernel path (the stand-in above; e5m2 through
    the bf16 grouped GEMM) against the emulated loop on the same FP8 operands and per-expert
    factors: equal up to the bf16 rounding of the kernels' outputs (2^-8 relative), so
    1e-2 of each output's range; a wrong group, padding or scale layout is off by order 1."""
    from megatron.core.fp8 import grouped_gemm
    from megatron.core.fp8.gemm import EMULATION, SCALED_MM

    gen = torch.Generator().manual_seed(5)
    counts, m, k, n = torch.tensor(COUNTS), ROWS, 32, 48
    a = (torch.randn(m, k, generator=gen) * 20).to(a_dtype)
    b = (torch.randn(len(COUNTS), n, k, generator=gen) * 20).to(E4M3)
    b_t = (torch.randn(k, m, generator=gen) * 20).to(E4M3)
    a_inv, b_inv = torch.rand(len(COUNTS), generator=gen) + 0.5, torch.rand(len(COUNTS), generator=gen) + 0.5
    plain, padded = row_layout(counts, m, padded=False), row_layout(counts, m, padded=True)
    ref_nt = grouped_gemm.grouped_nt(a, a_inv, b, b_inv, plain, torch.float32, EMULATION)
    a_t = a.float().t().contiguous().to(a_dtype)  # the [k, m] operand of the wgrad GEMM, [N_out = k]
    ref_tn = grouped_gemm.grouped_tn(a_t, a_inv, b_t, b_inv, plain, torch.float32, EMULATION)
    monkeypatch.setattr(grouped_gemm, "grouped_kernel_fits", lambda device, *dims: True)
    monkeypatch.setattr(torch, "_scaled_grouped_mm", _scaled_grouped_mm_on_cpu)
    nt = grouped_gemm.from_layout(grouped_gemm.grouped_nt(
        to_layout(a, padded), a_inv, b, b_inv, padded, torch.float32, SCALED_MM), padded)
    tn = grouped_gemm.grouped_tn(to_layout(a_t.t(), padded).t().contiguous(), a_inv,
                                 to_layout(b_t.t(), padded).t().contiguous(), b_inv, padded, torch.float32, SCALED_MM)
    torch.testing.assert_close(nt, ref_nt, rtol=1e-2, atol=1e-2 * ref_nt.abs().max().item())
    torch.testing.assert_close(tn, ref_tn, rtol=1e-2, atol=1e-2 * ref_tn.abs().max().item())
    assert not tn[1].any()  # the idle expert's weight gradient
    # --no-fp8-wgrad's high-precision wgrad, bf16 operands
    dy_hp, x_hp = a_t.float().t().bfloat16(), b_t.float().t().bfloat16()
    ref_hp = grouped_gemm.grouped_tn_high_precision(dy_hp, x_hp, plain, torch.float32, EMULATION)
    hp = grouped_gemm.grouped_tn_high_precision(to_layout(dy_hp, padded), to_layout(x_hp, padded), padded,
                                                torch.float32, SCALED_MM)
    torch.testing.assert_close(hp, ref_hp, rtol=1e-2, atol=1e-2 * ref_hp.abs().max().item())


def test_experts_follow_the_layers_fp8_scope_and_the_nan_check():
    """A 3-layer MoE GPT with --first-last-layers-bf16: only the middle layer's experts
    (and its attention linears) hold FP8 state; the NaN check covers an expert's scales."""
    from megatron.core.models.gpt import GPTModel
    from megatron.training.nan_check import NonFiniteError, check_finite

    config = _config(num_layers=3, fp8_recipe="delayed", first_last_layers_bf16=True, moe_grouped_gemm=True)
    model = GPTModel(config, vocab_size=64, max_sequence_length=8, position_embedding_type="rope")
    names = [n for n, m in model.named_modules() if isinstance(m, Fp8Scaling)]
    experts = [n for n in names if ".experts." in n]
    assert len(experts) == 2 * len(COUNTS) and all(n.startswith("decoder.layers.1.") for n in names)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    model(ids, None, None, labels=ids).sum().backward()
    history = model.decoder.layers[1].mlp.experts.local_experts[0].linear_fc1.fp8.amax_history
    assert history[0, 1] > 0  # the expert ran in FP8
    check_finite([torch.tensor(1.0)], [model], iteration=2)
    model.decoder.layers[1].mlp.experts.local_experts[3].linear_fc2.fp8.scale[2] = float("nan")
    with pytest.raises(NonFiniteError, match="FP8 amax history or scales"):
        check_finite([torch.tensor(1.0)], [model], iteration=2)


def test_loop_pads_each_expert_for_scaled_mm(caplog, monkeypatch):
    """The per-expert loop through torch._scaled_mm (its CPU kernel, where this torch has
    one): token counts that are no multiple of 16 are padded with zero rows, so every
    GEMM takes the FP8 kernel (no fallback warning) and the results equal the emulation's
    up to fp32 summation order."""
    from megatron.core.fp8 import gemm
    from megatron.core.transformer.moe import experts as experts_module

    probe = torch.zeros(16, 16).to(E4M3)
    try:
        torch._scaled_mm(probe, probe.t(), scale_a=torch.tensor(1.0), scale_b=torch.tensor(1.0),
                         out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError):
        pytest.skip("this torch has no CPU torch._scaled_mm")
    monkeypatch.setattr(gemm, "_warned_shapes", set())
    results, state = {}, _experts(SequentialMLP, _config()).state_dict()
    for backend in (gemm.EMULATION, gemm.SCALED_MM):
        module = _experts(SequentialMLP, _config())
        module.load_state_dict(state)
        monkeypatch.setattr(experts_module, "select_backend", lambda device, emulation, b=backend: b)
        with caplog.at_level("WARNING", logger="megatron.core.fp8.gemm"):
            results[backend] = _run(module, *_data(4))
    assert "not a multiple of 16" not in caplog.text
    for i, (a, b) in enumerate(zip(results[gemm.SCALED_MM], results[gemm.EMULATION])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item(), msg=lambda m: f"{i}: {m}")
