"""Chunked vocab-parallel cross entropy equals the reference (loss and logits grad), with
label smoothing, ragged chunks, half-precision logits and TP=2, and never creates an fp32
tensor as large as the whole micro-batch's logits.

Tolerance 1e-5: fp32 log-sum-exp over <= 64 logits, summed in another order.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from megatron.core.fusions.fused_cross_entropy import default_chunk_tokens, fused_vocab_parallel_cross_entropy
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from tests.multirank import run_on_ranks

TOL = dict(atol=1e-5, rtol=1e-5)
S, B, V = 7, 3, 64


def _data(dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(5)
    logits = (torch.randn(S, B, V, generator=gen) * 4).to(device, dtype)
    target = torch.randint(0, V, (S, B), generator=gen).to(device)
    weight = torch.rand(S, B, generator=gen).to(device)
    return logits, target, weight


def _loss_and_grad(fn, logits, target, weight):
    logits = logits.detach().clone().requires_grad_()
    loss = fn(logits, target)
    (loss * weight).sum().backward()
    return loss.detach(), logits.grad


def _torch_reference(eps):
    def fn(logits, target):
        flat = F.cross_entropy(logits.float().reshape(-1, V), target.reshape(-1), reduction="none", label_smoothing=eps)
        return flat.view(target.shape)

    return fn


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("chunk", [4, 5, 1000])  # ragged last chunk, 1-token remainder, one chunk
def test_chunked_matches_torch_and_reference(eps, chunk):
    logits, target, weight = _data()
    got = _loss_and_grad(lambda x, t: fused_vocab_parallel_cross_entropy(x, t, None, eps, chunk), logits, target, weight)
    want = _loss_and_grad(_torch_reference(eps), logits, target, weight)
    ours = _loss_and_grad(lambda x, t: vocab_parallel_cross_entropy(x, t, None, label_smoothing=eps), logits, target, weight)
    for a, b, c in zip(got, want, ours):
        torch.testing.assert_close(a, b, **TOL)
        torch.testing.assert_close(a, c, **TOL)


def test_traced_chunk_kernels_match_reference(traced):
    logits, target, weight = _data()
    fn = lambda x, t: fused_vocab_parallel_cross_entropy(x, t, None, 0.1, 7)  # noqa: E731
    for a, b in zip(_loss_and_grad(fn, logits, target, weight), _loss_and_grad(_torch_reference(0.1), logits, target, weight)):
        torch.testing.assert_close(a, b, **TOL)


def test_bf16_logits_get_a_bf16_gradient_from_fp32_math():
    logits, target, weight = _data(torch.bfloat16)
    loss, grad = _loss_and_grad(lambda x, t: fused_vocab_parallel_cross_entropy(x, t, None, 0.0, 4), logits, target, weight)
    want_loss, want_grad = _loss_and_grad(_torch_reference(0.0), logits.float(), target, weight)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, want_loss, **TOL)  # the loss sees the same bf16 values, in fp32
    torch.testing.assert_close(grad.float(), want_grad, atol=4e-3, rtol=1e-2)  # one bf16 rounding of the grad


class _LargestFp32(TorchDispatchMode):
    """Records the largest fp32 tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


def _largest_fp32(fn, logits, target):
    logits = logits.detach().clone().requires_grad_()
    with _LargestFp32() as mode:
        fn(logits, target).sum().backward()
    return mode.largest


def test_no_fp32_tensor_of_all_logits_is_created():
    logits, target, _ = _data(torch.bfloat16)
    chunked = _largest_fp32(lambda x, t: fused_vocab_parallel_cross_entropy(x, t, None, 0.0, 4), logits, target)
    reference = _largest_fp32(lambda x, t: vocab_parallel_cross_entropy(x.float(), t, None), logits, target)
    assert reference == S * B * V  # the yardstick does hold fp32 logits of the whole batch
    assert chunked <= 4 * V, f"largest fp32 tensor has {chunked} elements, a chunk has {4 * V}"


def test_default_chunk_respects_token_cap_and_element_budget():
    assert default_chunk_tokens(64) == 4096
    assert default_chunk_tokens(131072) == 1024
    assert default_chunk_tokens(2**40) == 1


def _tp2_rank(rank, world):
    logits, target, weight = _data()
    shard = logits.chunk(world, dim=-1)[rank]
    for eps in (0.0, 0.1):
        loss, grad = _loss_and_grad(
            lambda x, t: fused_vocab_parallel_cross_entropy(x, t, dist.group.WORLD, eps, 5), shard, target, weight
        )
        want_loss, want_grad = _loss_and_grad(_torch_reference(eps), logits, target, weight)
        torch.testing.assert_close(loss, want_loss, **TOL)
        torch.testing.assert_close(grad, want_grad.chunk(world, dim=-1)[rank], **TOL)
    return True


def test_tp2_matches_full_vocabulary_with_and_without_label_smoothing():
    assert run_on_ranks(_tp2_rank, 2, timeout=90) == [True, True]


@pytest.mark.gpu
def test_bf16_cuda_chunked_matches_reference_with_less_memory():
    tokens, vocab = 4096, 32768
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(tokens, 1, vocab, generator=gen) * 3).to("cuda", torch.bfloat16)
    target = torch.randint(0, vocab, (tokens, 1), generator=gen).cuda()
    weight = torch.ones(tokens, 1, device="cuda")
    results, peaks = [], []
    for fn in (
        lambda x, t: fused_vocab_parallel_cross_entropy(x, t, None, 0.0, 512),
        lambda x, t: vocab_parallel_cross_entropy(x.float(), t, None),
    ):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        results.append(_loss_and_grad(fn, logits, target, weight))
        peaks.append(torch.cuda.max_memory_allocated() - base)
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(results[0][1].float(), results[1][1].float(), atol=1e-3, rtol=2e-2)
    assert peaks[0] < peaks[1] / 2, f"chunked peak {peaks[0]} bytes vs reference {peaks[1]}"
