"""The experts' weight gradients added into ``main_grad`` inside the grouped GEMM.

The Triton kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1, chosen before the
kernel is defined: a child process) against fp32 products of the same operands:
ragged groups, an expert without rows, sizes that end mid-tile, and main_grads placed in
one buffer out of order with gaps between them (untouched elements must stay as they
were). Then the autograd function over two micro-batches: the forward and the input
gradient equal ``torch._grouped_mm``'s, main_grad holds the sum of the two fp32 products,
the weights are marked for the DDP hook. Tolerance: fp32 summation order (~1e-5).
The operands are fp16: the interpreter computes no bf16 products (it reads their bits as
integers). Skipped where Triton is not installed."""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from megatron.core.transformer.moe import grouped_wgrad

_KERNEL = textwrap.dedent("""
    import torch
    from megatron.core.transformer.moe.grouped_wgrad_triton import grouped_wgrad_accumulate
    torch.manual_seed(0)
    n, k = 40, 24
    for counts in ([5, 0, 37, 18], [1, 64, 0]):
        t = sum(counts)
        ends = torch.tensor(counts).cumsum(0).to(torch.int32)
        dy = torch.randn(t, n).half()
        x = torch.randn(t + 3, k).half()[:t]  # rows past the last group are never read
        buffer = torch.randn(len(counts) * (n * k + 11) + 5)
        offsets = torch.tensor([5 + (len(counts) - 1 - g) * (n * k + 11) for g in range(len(counts))])
        before = buffer.clone()
        grouped_wgrad_accumulate(buffer, offsets, dy, x, ends, block_n=16, block_k=16, block_t=16, group_n=2,
                                 num_warps=4, num_stages=1)
        touched = torch.zeros_like(buffer, dtype=torch.bool)
        start = 0
        for g, count in enumerate(counts):
            o = int(offsets[g])
            rows = slice(start, start + count)
            want = before[o:o + n * k].view(n, k) + dy[rows].float().t() @ x[rows].float()
            torch.testing.assert_close(buffer[o:o + n * k].view(n, k), want, rtol=1e-5, atol=1e-5)
            touched[o:o + n * k] = True
            start += count
        assert torch.equal(buffer[~touched], before[~touched])
    print("ok")
""")

_FUNCTION = textwrap.dedent("""
    import torch
    from megatron.core.transformer.moe import expert_weights, grouped_wgrad
    torch.manual_seed(0)
    g, n, k = 3, 32, 16
    weights = [torch.nn.Parameter(torch.randn(n, k).half()) for _ in range(g)]
    expert_weights.place_adjacent(weights)
    buffer = torch.zeros(g * n * k + 7)
    for i, w in enumerate(weights):  # reverse order, as the DDP buffer places them
        w.main_grad = buffer[7 + (g - 1 - i) * n * k:][:n * k].view(n, k)
    assert grouped_wgrad.accumulates_in_gemm(weights)
    import megatron.core.transformer.moe.grouped_wgrad_triton as kernel
    plain = kernel.grouped_wgrad_accumulate
    kernel.grouped_wgrad_accumulate = lambda *a: plain(*a, block_n=16, block_k=16, block_t=16, num_warps=4,
                                                        num_stages=1)
    expected = [torch.zeros(n, k) for _ in range(g)]
    for counts in ([7, 0, 20], [9, 12, 5]):
        ends = torch.tensor(counts).cumsum(0).to(torch.int32)
        x = torch.randn(sum(counts), k).half().requires_grad_()
        out = grouped_wgrad.grouped_linear_accumulating(x, weights, ends)
        ref_x = x.detach().clone().requires_grad_()
        ref_w = torch.stack([w.detach() for w in weights]).requires_grad_()
        ref = torch.ops.aten._grouped_mm(ref_x, ref_w.transpose(-2, -1), offs=ends)
        assert torch.equal(out, ref)
        dy = torch.randn_like(out)
        out.backward(dy)
        ref.backward(dy)
        assert torch.equal(x.grad, ref_x.grad)
        start = 0
        for i, count in enumerate(counts):
            rows = slice(start, start + count)
            expected[i] += dy[rows].float().t() @ x.detach()[rows].float()
            start += count
        assert all(w.grad_added_to_main_grad for w in weights)
    for w, want in zip(weights, expected):
        torch.testing.assert_close(w.main_grad, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(buffer[:7], torch.zeros(7))
    print("ok")
""")


def _run_interpreted(script: str) -> None:
    repo = Path(__file__).resolve().parents[4]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(repo))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


@needs_triton
def test_kernel_adds_each_groups_product_into_its_slice_of_the_buffer():
    _run_interpreted(_KERNEL)


@needs_triton
def test_grouped_linear_puts_two_micro_batches_of_weight_gradients_into_main_grad():
    _run_interpreted(_FUNCTION)


def test_accumulates_only_into_fp32_slices_of_one_buffer():
    weights = [torch.nn.Parameter(torch.zeros(4, 2, dtype=torch.bfloat16)) for _ in range(2)]
    assert not grouped_wgrad.accumulates_in_gemm(weights)  # no main_grad yet
    buffer = torch.zeros(16)
    weights[0].main_grad, weights[1].main_grad = buffer[:8].view(4, 2), buffer[8:].view(4, 2)
    assert grouped_wgrad.accumulates_in_gemm(weights) == grouped_wgrad._TRITON
    weights[1].main_grad = torch.zeros(4, 2)  # another buffer
    assert not grouped_wgrad.accumulates_in_gemm(weights)
    weights[1].main_grad = buffer[8:].view(4, 2).half()
    assert not grouped_wgrad.accumulates_in_gemm(weights)
    weights[1].main_grad = buffer[8:].view(2, 4).t()  # not contiguous
    assert not grouped_wgrad.accumulates_in_gemm(weights)


def _kernel_in_torch(flat, offsets, dy, x, ends, **_tiles):
    """The kernel's contract in plain torch (the kernel itself is checked above)."""
    n, k, start = dy.size(1), x.size(1), 0
    for g, end in enumerate(ends.tolist()):
        o = int(offsets[g])
        flat[o:o + n * k].view(n, k).add_(dy[start:end].float().t() @ x[start:end].float())
        start = end


@pytest.mark.parametrize("fusion", [True, False])
def test_grouped_mlp_sends_expert_gradients_to_main_grad_under_accumulation_fusion(fusion, monkeypatch):
    """GroupedMLP over two micro-batches, its weights' main_grads slices of one fp32 buffer
    (as DDP places them): with --gradient-accumulation-fusion the grouped linear adds the
    weight gradients there itself (and marks them), without it autograd returns them; the
    sums equal the per-expert loop's gradients either way."""
    import megatron.core.transformer.moe.grouped_wgrad_triton as kernel
    from megatron.core.transformer.moe import experts as experts_module
    from megatron.core.transformer.moe.experts import GroupedMLP, SequentialMLP
    from tests.core.transformer.moe.moe_cases import moe_config

    calls = []
    monkeypatch.setattr(grouped_wgrad, "_TRITON", True)
    monkeypatch.setattr(kernel, "grouped_wgrad_accumulate", lambda *a, **kw: calls.append(1) or _kernel_in_torch(*a))
    monkeypatch.setattr(experts_module, "grouped_mm_available", lambda x, w: True)
    monkeypatch.setitem(experts_module._UNALIGNED_GROUPS_OK, torch.device("cpu"), True)
    config = moe_config(gradient_accumulation_fusion=fusion)
    loop = SequentialMLP(config, 1, range(4)).half()
    grouped = GroupedMLP(config, 1, range(4)).half()
    grouped.load_state_dict(loop.state_dict())
    params = list(grouped.parameters())
    buffer = torch.zeros(sum(p.numel() for p in params))
    offset = buffer.numel()
    for p in params:  # reverse order, as DDP's buffer
        offset -= p.numel()
        p.main_grad = buffer[offset:offset + p.numel()].view_as(p)
        p.grad_added_to_main_grad = False
    torch.manual_seed(0)
    for counts in ([3, 0, 9, 4], [5, 6, 1, 2]):
        x = torch.randn(sum(counts), 16).half()
        grad = torch.randn(sum(counts), 16).half()
        loop(x, counts).backward(grad)
        grouped(x, torch.tensor(counts)).backward(grad)
        for p in params:  # the DDP hook
            if not p.grad_added_to_main_grad:
                p.main_grad.add_(p.grad)
            p.grad = None
    assert bool(calls) == fusion and all(p.grad_added_to_main_grad == fusion for p in params)
    for (name, want), p in zip(loop.named_parameters(), params):
        torch.testing.assert_close(p.main_grad, want.grad.float(), rtol=2e-3, atol=2e-3, msg=name)
