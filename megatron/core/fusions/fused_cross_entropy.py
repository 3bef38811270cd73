"""Vocab-parallel cross entropy computed in chunks of tokens, never holding fp32 logits
for the whole micro-batch.

The reference (``tensor_parallel.cross_entropy``) upcasts all [tokens, V/tp] logits to
fp32 and keeps the fp32 softmax for backward: 8 bytes per logit at the peak, on top of
the logits themselves. Here the forward walks the tokens in chunks, and each chunk,
upcast on the fly, yields four numbers per token: the local max, the local sum of
exp(logit - local max), the target's logit (0 when another rank holds it) and, with
label smoothing, the sum of logits. Two all-reduces over the tensor-parallel group
(max, then the sums rescaled to the global max) give log-sum-exp per token. Backward
saves only the logits (in their own dtype, usually bf16), the targets and log-sum-exp
[tokens] fp32, and recomputes softmax chunk by chunk, writing the gradient directly in
the logits' dtype. On CUDA each chunk's statistics and gradient are one fused kernel.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron.core.fusions.compiled_region import CompiledRegion
from megatron.core.process_groups import group_rank, group_size
from megatron.core.tensor_parallel.cross_entropy import all_reduce_max_inplace, all_reduce_sum_inplace
from megatron.core.tensor_parallel.partition import VocabUtility

MAX_CHUNK_TOKENS = 4096
# fp32 elements of one chunk's upcast logits (512 MiB): large enough that every chunk
# kernel fills the GPU, small enough to be a fraction of the logits' own memory.
CHUNK_ELEMENT_BUDGET = 2**27


def default_chunk_tokens(vocab_partition_size: int) -> int:
    """Tokens per chunk: at most MAX_CHUNK_TOKENS and CHUNK_ELEMENT_BUDGET / (V/tp)."""
    return max(1, min(MAX_CHUNK_TOKENS, CHUNK_ELEMENT_BUDGET // vocab_partition_size))


def _local_target(target: torch.Tensor, vocab_start: int, vocab_end: int):
    """(index into this rank's shard, clamped to 0 when elsewhere; whether it is here)."""
    here = (target >= vocab_start) & (target < vocab_end)
    return torch.where(here, target - vocab_start, torch.zeros_like(target)), here


def chunk_statistics(logits: torch.Tensor, target: torch.Tensor, vocab_start: int, vocab_end: int, with_sum: bool):
    """logits [n, V/tp] (any float dtype), target [n] global ids -> fp32 [n] each:
    local max, sum of exp(logit - local max), target logit (0 if not on this rank), and
    the sum of logits (None unless ``with_sum``)."""
    lf = logits.float()
    local_max = lf.max(dim=-1).values
    sum_exp = torch.exp(lf - local_max.unsqueeze(-1)).sum(dim=-1)
    index, here = _local_target(target, vocab_start, vocab_end)
    predicted = lf.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    predicted = torch.where(here, predicted, torch.zeros_like(predicted))
    sum_logits = lf.sum(dim=-1) if with_sum else None
    return local_max, sum_exp, predicted, sum_logits


def chunk_gradient(
    logits: torch.Tensor,
    target: torch.Tensor,
    log_sum_exp: torch.Tensor,
    grad_loss: torch.Tensor,
    vocab_start: int,
    vocab_end: int,
    label_smoothing: float,
    vocab_size: int,
) -> torch.Tensor:
    """d loss / d logits for one chunk, in the logits' dtype:
    (softmax - (1 - eps) * onehot(target) - eps / V) * grad_loss."""
    probs = torch.exp(logits.float() - log_sum_exp.unsqueeze(-1))
    index, here = _local_target(target, vocab_start, vocab_end)
    columns = torch.arange(logits.shape[-1], device=logits.device)
    onehot = (columns.unsqueeze(0) == index.unsqueeze(-1)) & here.unsqueeze(-1)
    grad = probs - (1.0 - label_smoothing) * onehot.float()
    if label_smoothing > 0:
        grad = grad - label_smoothing / vocab_size
    return (grad * grad_loss.unsqueeze(-1)).to(logits.dtype)


_chunk_statistics = CompiledRegion(chunk_statistics, "cross_entropy_chunk_statistics")
_chunk_gradient = CompiledRegion(chunk_gradient, "cross_entropy_chunk_gradient")


class _ChunkedVocabParallelCrossEntropy(torch.autograd.Function):
    """Forward: per-token loss [tokens] fp32 from vocab-sharded logits. Backward: the exact
    gradient, recomputed chunk by chunk from the saved logits and log-sum-exp."""

    @staticmethod
    def forward(ctx, logits, target, tp_group, label_smoothing, chunk_tokens):
        partition_vocab = logits.size(-1)
        logits_2d = logits.reshape(-1, partition_vocab)  # a view for the model's contiguous logits
        target_1d = target.reshape(-1)
        rank, world = group_rank(tp_group), group_size(tp_group)
        vocab_start, vocab_end = VocabUtility.vocab_range_from_per_partition_vocab_size(partition_vocab, rank, world)
        with_sum = label_smoothing > 0
        tokens = logits_2d.size(0)
        stats = torch.empty(4 if with_sum else 3, tokens, dtype=torch.float32, device=logits.device)
        for lo in range(0, tokens, chunk_tokens):
            hi = min(tokens, lo + chunk_tokens)
            chunk = _chunk_statistics(logits_2d[lo:hi], target_1d[lo:hi], vocab_start, vocab_end, with_sum)
            for row, value in enumerate(chunk[: stats.size(0)]):
                stats[row, lo:hi] = value

        local_max = stats[0]
        global_max = local_max.clone()
        all_reduce_max_inplace(global_max, tp_group)
        # rows 1.. are sums over the vocabulary: rescale this rank's sum of exponentials to
        # the global max, then one all-reduce carries [sum exp, target logit (, sum logits)]
        stats[1].mul_(torch.exp(local_max - global_max))
        sums = stats[1:]
        all_reduce_sum_inplace(sums, tp_group)
        log_sum_exp = global_max + torch.log(sums[0])
        vocab_size = partition_vocab * world
        if with_sum:
            loss = log_sum_exp - (1.0 - label_smoothing) * sums[1] - label_smoothing * sums[2] / vocab_size
        else:
            loss = log_sum_exp - sums[1]

        ctx.save_for_backward(logits_2d, target_1d, log_sum_exp)
        ctx.meta = (logits.shape, vocab_start, vocab_end, label_smoothing, vocab_size, chunk_tokens)
        return loss.view(target.shape)

    @staticmethod
    def backward(ctx, grad_output):
        logits_2d, target_1d, log_sum_exp = ctx.saved_tensors
        shape, vocab_start, vocab_end, label_smoothing, vocab_size, chunk_tokens = ctx.meta
        grad_1d = grad_output.reshape(-1).float()
        grad_logits = torch.empty_like(logits_2d)
        for lo in range(0, logits_2d.size(0), chunk_tokens):
            hi = min(logits_2d.size(0), lo + chunk_tokens)
            grad_logits[lo:hi] = _chunk_gradient(
                logits_2d[lo:hi], target_1d[lo:hi], log_sum_exp[lo:hi], grad_1d[lo:hi],
                vocab_start, vocab_end, label_smoothing, vocab_size,
            )
        return grad_logits.view(shape), None, None, None, None


def fused_vocab_parallel_cross_entropy(
    vocab_parallel_logits: torch.Tensor,
    target: torch.Tensor,
    tp_group,
    label_smoothing: float = 0.0,
    chunk_tokens: Optional[int] = None,
) -> torch.Tensor:
    """Per-token cross entropy of vocab-parallel logits, chunked over tokens.

    Same contract as ``tensor_parallel.vocab_parallel_cross_entropy``: logits [s, b, V/tp]
    in any float dtype (math in fp32 per chunk; the gradient comes back in the logits'
    dtype), target [s, b] global ids, tp_group the tensor-parallel group (None: one rank
    holds the whole vocabulary); returns the loss [s, b] fp32. ``chunk_tokens`` defaults
    to ``default_chunk_tokens(V/tp)``.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if target.shape != vocab_parallel_logits.shape[:-1]:
        raise ValueError(
            f"cross entropy: target shape {tuple(target.shape)} does not match logits "
            f"{tuple(vocab_parallel_logits.shape)} without the vocabulary dim"
        )
    if chunk_tokens is None:
        chunk_tokens = default_chunk_tokens(vocab_parallel_logits.size(-1))
    if chunk_tokens < 1:
        raise ValueError(f"cross entropy chunk_tokens must be >= 1, got {chunk_tokens}")
    return _ChunkedVocabParallelCrossEntropy.apply(
        vocab_parallel_logits, target, tp_group, label_smoothing, chunk_tokens
    )
