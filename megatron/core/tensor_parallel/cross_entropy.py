"""Cross entropy over vocabulary-parallel logits, without gathering the full logits.

Each tensor-parallel rank holds logits for a contiguous slice of the vocabulary. The
softmax normalizer needs the global max and the global sum of exponentials, and the loss
needs the target's logit, which lives on one rank only: these are the only values
all-reduced (a few numbers per token), never the [s, b, V] logits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron.core.process_groups import group_rank, group_size
from megatron.core.tensor_parallel.partition import VocabUtility


def all_reduce_max_inplace(tensor: torch.Tensor, group) -> None:
    """In place: element-wise max over ``group`` (no autograd; for use inside a Function).
    Backward: none (callers compute their own gradient)."""
    if group_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)


def all_reduce_sum_inplace(tensor: torch.Tensor, group) -> None:
    """In place: element-wise sum over ``group`` (no autograd; for use inside a Function).
    Backward: none (callers compute their own gradient)."""
    if group_size(group) > 1:
        dist.all_reduce(tensor, group=group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Forward: per-token loss from vocab-sharded logits. Backward: exact gradient
    ``softmax - (1 - eps) * onehot(target) - eps / V`` times the incoming gradient, written
    into the saved softmax buffer (so no second [s, b, V/tp] buffer is allocated)."""

    @staticmethod
    def forward(ctx, vocab_parallel_logits, target, tp_group, label_smoothing):
        input_dtype = vocab_parallel_logits.dtype
        logits = vocab_parallel_logits.float()
        logits_max = logits.max(dim=-1)[0]
        all_reduce_max_inplace(logits_max, tp_group)
        # A new fp32 buffer, shifted for a stable exp; the caller's logits stay untouched.
        if logits is vocab_parallel_logits:
            logits = logits - logits_max.unsqueeze(-1)
        else:
            logits.sub_(logits_max.unsqueeze(-1))
        logits = logits.contiguous()  # a transposed [b, s, V] -> [s, b, V] view is allowed

        partition_vocab = logits.size(-1)
        rank, world = group_rank(tp_group), group_size(tp_group)
        vocab_start, vocab_end = VocabUtility.vocab_range_from_per_partition_vocab_size(partition_vocab, rank, world)
        target_mask = (target < vocab_start) | (target >= vocab_end)
        masked_target = (target - vocab_start).masked_fill(target_mask, 0)

        logits_2d = logits.view(-1, partition_vocab)
        rows = torch.arange(logits_2d.size(0), device=logits.device)
        predicted = logits_2d[rows, masked_target.reshape(-1)].masked_fill(target_mask.reshape(-1), 0.0)
        # the smoothing term needs the plain logits, so sum them before exp_ overwrites them
        sum_logits = logits_2d.sum(dim=-1) if label_smoothing > 0 else None
        exp_logits = logits.exp_()
        sum_exp = exp_logits.view(-1, partition_vocab).sum(dim=-1)
        # one all-reduce carries every per-token sum: [target logit, sum exp (, sum logits)]
        packed = torch.stack([predicted, sum_exp] + ([sum_logits] if sum_logits is not None else []))
        all_reduce_sum_inplace(packed, tp_group)

        predicted_logit, sum_exp = packed[0], packed[1]
        log_sum_exp = torch.log(sum_exp)
        vocab_size = partition_vocab * world
        if label_smoothing > 0:
            mean_logit = packed[2] / vocab_size
            loss = log_sum_exp - (1.0 - label_smoothing) * predicted_logit - label_smoothing * mean_logit
        else:
            loss = log_sum_exp - predicted_logit

        softmax = exp_logits.div_(sum_exp.view(exp_logits.shape[:-1] + (1,)))
        ctx.label_smoothing, ctx.vocab_size, ctx.input_dtype = label_smoothing, vocab_size, input_dtype
        ctx.save_for_backward(softmax, target_mask, masked_target)
        return loss.view(target.shape)

    @staticmethod
    def backward(ctx, grad_output):
        softmax, target_mask, masked_target = ctx.saved_tensors
        partition_vocab = softmax.size(-1)
        # The saved softmax becomes the gradient; backward therefore runs once per forward.
        grad_2d = softmax.view(-1, partition_vocab)
        rows = torch.arange(grad_2d.size(0), device=grad_2d.device)
        on_this_rank = 1.0 - target_mask.reshape(-1).float()
        eps = ctx.label_smoothing
        grad_2d[rows, masked_target.reshape(-1)] -= (1.0 - eps) * on_this_rank
        if eps > 0:
            grad_2d -= eps / ctx.vocab_size
        softmax.mul_(grad_output.unsqueeze(-1).float())
        return softmax.to(ctx.input_dtype), None, None, None


def vocab_parallel_cross_entropy(
    vocab_parallel_logits: torch.Tensor, target: torch.Tensor, tp_group, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Per-token cross entropy of vocab-parallel logits.

    vocab_parallel_logits: [s, b, V / tp], any float dtype (computed in fp32); this rank
    holds vocabulary ids [rank * V/tp, (rank + 1) * V/tp). target: [s, b] int64 global ids.
    tp_group: the tensor-parallel group (None: one rank holds the whole vocabulary).
    Returns the loss [s, b] in fp32. ``label_smoothing`` eps follows
    ``torch.nn.functional.cross_entropy``: the target distribution is
    ``(1 - eps) * onehot + eps / V`` over the global vocabulary V.
    """
    if isinstance(tp_group, (int, float)) and not isinstance(tp_group, bool):
        raise TypeError(
            "vocab_parallel_cross_entropy(logits, target, tp_group, label_smoothing=0.0): the "
            f"third argument is the tensor-parallel group, got the number {tp_group!r}; pass "
            "label_smoothing by keyword"
        )
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    return _VocabParallelCrossEntropy.apply(vocab_parallel_logits, target, tp_group, label_smoothing)
