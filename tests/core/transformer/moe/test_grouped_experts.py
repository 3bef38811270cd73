"""GroupedMLP's padded grouped-GEMM buffer (device-side slots and offsets, host-known
size) gives what the per-expert loop gives, forward and backward, with idle experts.

On CPU torch._grouped_mm runs in fp32, so the test forces the grouped path there
(production uses it on Hopper in bf16 only); the products are the loop's, and 1e-5 is
float32 rounding room far below a misplaced row (order 1e-1). The GPU tests run the real
kernel in bf16 and check that a training step of a one-GPU MoE layer never synchronizes.
"""

import pytest
import torch

from megatron.core.transformer.aux_loss_scale import auxiliary_loss_scale
from megatron.core.transformer.moe import expert_weights
from megatron.core.transformer.moe import experts as experts_module
from megatron.core.transformer.moe.experts import GroupedMLP, SequentialMLP, _grouped_mm_groups
from tests.core.transformer.moe.moe_cases import HostRead, build_layer, forbid_host_reads, inputs, moe_config

TOL = dict(atol=1e-5, rtol=1e-5)
CPU = torch.device("cpu")


@pytest.fixture(params=[False, True], ids=["padded", "unaligned"])
def unaligned(request, monkeypatch):
    """Both grouped-GEMM layouts: groups padded in a buffer, or used in place where the
    kernel takes groups of any row count (the probe's answer, forced here)."""
    monkeypatch.setitem(experts_module._UNALIGNED_GROUPS_OK, CPU, request.param)
    return request.param


def _pair(config, device="cpu", dtype=torch.float32):
    loop = SequentialMLP(config, 1, range(4)).to(device, dtype)
    grouped = GroupedMLP(config, 1, range(4)).to(device, dtype)
    grouped.load_state_dict(loop.state_dict())
    return loop, grouped


def _run(module, x, counts, grad):
    x = x.clone().requires_grad_(True)
    out = module(x, counts)
    out.backward(grad)
    return [out, x.grad] + [p.grad for p in module.parameters()]


def test_padded_groups_layout(monkeypatch):
    monkeypatch.setitem(experts_module._UNALIGNED_GROUPS_OK, CPU, False)
    counts = torch.tensor([3, 0, 17, 16])
    groups = _grouped_mm_groups(counts, 36)
    assert groups.rows == 36 + 4 * 15
    assert groups.offsets.dtype == torch.int32 and groups.offsets.tolist() == [16, 16, 48, 64]
    expected = list(range(0, 3)) + list(range(16, 33)) + list(range(48, 64))
    assert groups.slot.tolist() == expected
    assert groups.expert.tolist() == [0] * 3 + [2] * 17 + [3] * 16


def test_unaligned_groups_layout(monkeypatch):
    monkeypatch.setitem(experts_module._UNALIGNED_GROUPS_OK, CPU, True)
    groups = _grouped_mm_groups(torch.tensor([3, 0, 17, 16]), 36)
    assert groups.slot is None and groups.rows == 36
    assert groups.offsets.dtype == torch.int32 and groups.offsets.tolist() == [3, 3, 20, 36]
    assert groups.expert.tolist() == [0] * 3 + [2] * 17 + [3] * 16


def test_unaligned_probe_runs_the_kernel():
    # torch 2.13's CPU grouped GEMM takes groups of any size; the probe must say so.
    experts_module._UNALIGNED_GROUPS_OK.pop(CPU, None)
    assert experts_module.grouped_mm_takes_unaligned_groups(CPU) is True


@pytest.mark.parametrize("counts", [[3, 0, 20, 8], [0, 0, 0, 31], [16, 1, 0, 14]])
@pytest.mark.parametrize("bias", [False, True])
def test_grouped_mm_path_equals_loop_on_cpu(counts, bias, unaligned, monkeypatch):
    monkeypatch.setattr(experts_module, "grouped_mm_available", lambda x, w: True)
    loop, grouped = _pair(moe_config(add_bias_linear=bias))
    n = sum(counts)
    x, grad = torch.randn(n, 16), torch.randn(n, 16)
    device_counts = torch.tensor(counts)
    for a, b in zip(_run(loop, x, counts, grad), _run(grouped, x, device_counts, grad)):
        torch.testing.assert_close(a, b, **TOL)


def test_grouped_mm_path_is_the_one_taken(unaligned, monkeypatch):
    """A planted bug in the grouped-GEMM offsets (one group shifted) is caught."""
    monkeypatch.setattr(experts_module, "grouped_mm_available", lambda x, w: True)
    original = experts_module._grouped_mm_groups

    def shifted(counts, num_rows):
        groups = original(counts, num_rows)
        groups.offsets = groups.offsets.roll(1)
        return groups

    monkeypatch.setattr(experts_module, "_grouped_mm_groups", shifted)
    loop, grouped = _pair(moe_config())
    x = torch.randn(30, 16)
    assert (loop(x, [10, 0, 12, 8]) - grouped(x, torch.tensor([10, 0, 12, 8]))).abs().max().item() > 1e-2


@pytest.mark.gpu
def test_grouped_mm_upper_bound_buffer_on_gpu_matches_loop_in_bf16():
    """torch._grouped_mm with the upper-bound buffer against the loop, CUDA bf16, an idle expert."""
    config = moe_config(hidden_size=64, ffn_hidden_size=128, num_attention_heads=4)
    loop, grouped = _pair(config, "cuda", torch.bfloat16)
    counts = [10, 0, 20, 7]
    x = torch.randn(37, 64, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn_like(x)
    assert experts_module.grouped_mm_available(x, torch.empty(4, 64, 256, device="cuda", dtype=torch.bfloat16))
    # bf16 rounding of the intermediate differs between the kernels: compare by relative
    # norm (1e-2 is a few bf16 ulps; a misplaced row or group is off by order 1).
    for a, b in zip(_run(loop, x, counts, grad), _run(grouped, x, torch.tensor(counts, device="cuda"), grad)):
        assert (a.float() - b.float()).norm().item() <= 1e-2 * b.float().norm().item() + 1e-6


@pytest.mark.parametrize("dispatcher", ["allgather", "alltoall"])
def test_moe_layer_training_step_reads_nothing_on_the_host(dispatcher, unaligned, monkeypatch):
    """Router (aux and z losses, metrics), dispatch, grouped GEMM with the padded buffer and
    combine, forward and backward, under ``forbid_host_reads``; the per-expert loop, which
    needs host sizes, is the planted failure."""
    monkeypatch.setattr(experts_module, "grouped_mm_available", lambda x, w: True)
    for grouped in (True, False):
        config = moe_config(moe_grouped_gemm=grouped, moe_token_dispatcher_type=dispatcher, moe_aux_loss_coeff=1e-2,
                            moe_z_loss_coeff=1e-3, moe_router_load_balancing_type="aux_loss")
        layer = build_layer(config).train()
        hidden, grad = inputs()
        hidden.requires_grad_(True)
        with monkeypatch.context() as guarded:
            forbid_host_reads(guarded)
            if grouped:
                layer(hidden)[0].backward(grad)
            else:
                with pytest.raises(HostRead):
                    layer(hidden)
        assert not grouped or hidden.grad is not None


@pytest.mark.gpu
@pytest.mark.parametrize("dispatcher", ["allgather", "alltoall"])
def test_one_gpu_moe_layer_step_never_synchronizes(dispatcher):
    """Forward and backward of a dropless top-2 layer with grouped GEMM, aux loss on,
    under CUDA's sync debug mode set to raise on any synchronizing call (host reads and
    blocking host-to-device copies alike)."""
    config = moe_config(hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, moe_grouped_gemm=True,
                        moe_token_dispatcher_type=dispatcher, moe_aux_loss_coeff=1e-2,
                        moe_router_load_balancing_type="aux_loss")
    layer = build_layer(config).cuda().bfloat16().train()
    hidden = torch.randn(8, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layer(hidden)  # warm-up: lazy initialization may synchronize once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        # Inside a schedule's scale, as in training: the aux-loss backward uses that scale.
        with auxiliary_loss_scale(0.5):
            out, _ = layer(hidden)
        out.float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert hidden.grad is not None



def _stack_calls(monkeypatch):
    calls = []
    original = torch.stack
    monkeypatch.setattr(torch, "stack", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def test_expert_weights_are_one_stacked_view_without_copies(monkeypatch):
    """The per-expert weights stay Megatron's parameters but view one [G, out, in] tensor,
    also after a dtype move; the forward then copies no weights (torch.stack not called)."""
    loop, grouped = _pair(moe_config(add_bias_linear=True))
    loop, grouped = loop.double(), grouped.double()
    names = ("linear_fc1.weight", "linear_fc2.weight", "linear_fc1.bias", "linear_fc2.bias")
    for name in names:
        assert expert_weights.are_adjacent(grouped._expert_params(name)), name
    calls = _stack_calls(monkeypatch)
    x, grad = torch.randn(30, 16, dtype=torch.float64), torch.randn(30, 16, dtype=torch.float64)
    results = [_run(loop, x, [10, 0, 12, 8], grad), _run(grouped, x, [10, 0, 12, 8], grad)]
    assert calls == []
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_rehomed_weights_fall_back_to_a_copy(monkeypatch):
    """A buffer that takes over the parameters' data (the distributed optimizer's) breaks
    the adjacency: the forward stacks copies instead, reads the buffer's values, and the
    gradients still reach every expert."""
    from megatron.core.distributed.param_and_grad_buffer import ParamAndGradBuffer

    loop, grouped = _pair(moe_config())
    buffer = ParamAndGradBuffer(list(grouped.parameters()), torch.float32, None, 1.0, use_distributed_optimizer=True)
    assert not expert_weights.are_adjacent(grouped._expert_params("linear_fc1.weight"))
    with torch.no_grad():
        buffer.param_data.mul_(2.0)  # an optimizer step writes the buffer; the model must see it
        for p in loop.parameters():
            p.mul_(2.0)
    calls = _stack_calls(monkeypatch)
    x, grad = torch.randn(30, 16), torch.randn(30, 16)
    results = [_run(loop, x, [10, 0, 12, 8], grad), _run(grouped, x, torch.tensor([10, 0, 12, 8]), grad)]
    assert calls
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **TOL)
