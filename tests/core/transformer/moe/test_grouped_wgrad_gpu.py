"""The grouped weight-gradient kernel compiled on a GPU (CPU runs check it in Triton's
interpreter): bf16 operands at the default tile shape against fp32 products, ragged
groups with an idle expert and sizes that end mid-tile; then a GroupedMLP's main_grads
after two bf16 micro-batches with and without gradient accumulation fusion. The unfused
path rounds each micro-batch's gradient to bf16 before adding it, so the two agree to a
few bf16 ulps (relative norm 1e-2); a misplaced group is off by order 1."""

import pytest
import torch

from megatron.core.transformer.moe import experts as experts_module
from megatron.core.transformer.moe.experts import GroupedMLP
from megatron.core.transformer.moe.grouped_wgrad_triton import grouped_wgrad_accumulate
from tests.core.transformer.moe.moe_cases import moe_config

pytestmark = pytest.mark.gpu


def test_kernel_in_bf16_equals_fp32_products():
    torch.manual_seed(0)
    n, k, counts = 300, 200, [70, 0, 333, 129]
    ends = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
    dy = torch.randn(sum(counts), n, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(sum(counts), k, device="cuda", dtype=torch.bfloat16)
    buffer = torch.randn(len(counts) * n * k + 3, device="cuda")
    offsets = torch.tensor([3 + (len(counts) - 1 - g) * n * k for g in range(len(counts))], device="cuda")
    before = buffer.clone()
    grouped_wgrad_accumulate(buffer, offsets, dy, x, ends)
    start = 0
    for g, count in enumerate(counts):
        o = int(offsets[g])
        want = before[o:o + n * k].view(n, k) + dy[start:start + count].float().t() @ x[start:start + count].float()
        torch.testing.assert_close(buffer[o:o + n * k].view(n, k), want, rtol=1e-4, atol=1e-3)
        start += count
    assert torch.equal(buffer[:3], before[:3])


def _main_grads(fusion: bool):
    torch.manual_seed(0)
    config = moe_config(hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, gradient_accumulation_fusion=fusion)
    mlp = GroupedMLP(config, 1, range(4)).cuda().bfloat16()
    params = list(mlp.parameters())
    buffer = torch.zeros(sum(p.numel() for p in params), device="cuda")
    offset = buffer.numel()
    for p in params:
        offset -= p.numel()
        p.main_grad = buffer[offset:offset + p.numel()].view_as(p)
        p.grad_added_to_main_grad = False
    for counts in ([10, 0, 20, 7], [1, 30, 2, 4]):
        x = torch.randn(sum(counts), 64, device="cuda", dtype=torch.bfloat16)
        mlp(x, torch.tensor(counts, device="cuda")).backward(torch.randn_like(x))
        for p in params:
            if not p.grad_added_to_main_grad:
                p.main_grad.add_(p.grad)
            p.grad = None
    assert all(p.grad_added_to_main_grad == fusion for p in params)
    return [p.main_grad.clone() for p in params]


def test_grouped_mlp_main_grads_with_and_without_fusion_agree():
    probe = torch.empty(4, 64, 256, device="cuda", dtype=torch.bfloat16)
    if not (experts_module.grouped_mm_available(probe[0], probe)
            and experts_module.grouped_mm_takes_unaligned_groups(probe.device)):
        pytest.skip("needs torch._grouped_mm on groups of any size (Hopper, bf16)")
    for fused, plain in zip(_main_grads(True), _main_grads(False)):
        assert (fused - plain).norm().item() <= 1e-2 * plain.norm().item() + 1e-6
