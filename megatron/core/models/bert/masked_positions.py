"""The masked-LM head on the masked positions only.

BERT's loss reads the LM head at the ~15% of positions the dataset masked; the other
positions' logits (a [tokens, vocab] GEMM forward and backward, and the cross entropy over
them) are computed and then multiplied by a zero loss mask. Running the head on the masked
positions alone gives the same loss and the same gradients (the unmasked positions'
gradients are zero either way) for about a sixth of the head's work.

CUDA graphs and the pipeline schedules need fixed shapes, so each sequence contributes a
fixed number ``limit`` of positions: its masked ones first, in order, then unmasked ones
that the loss ignores. Megatron's masked datasets mark at most ``floor(mask_prob *
seq_length)`` positions per sample (``masked_positions_limit``), which bounds ``limit``.

Under sequence parallelism each tensor-parallel rank holds a contiguous slice of the
sequence and picks up to ``limit`` positions within its own slice; the output layer's
all-gather then concatenates the ranks' picks, in rank order, which is the order
``selected_positions`` returns for every slice.
"""

from __future__ import annotations

import math

import torch


def masked_positions_limit(mask_prob: float, seq_length: int) -> int:
    """The most positions Megatron's masked datasets mark in one sample of ``seq_length``.

    Their budget is ``min(mask_prob * target_length, ...)`` with target_length <= seq_length,
    and a float product is monotone in its factor, so the count never passes this floor."""
    return max(1, math.floor(mask_prob * seq_length))


def selected_positions(loss_mask: torch.Tensor, limit: int, slices: int) -> torch.Tensor:
    """[b, slices * k] positions into the sequence (k = min(limit, s / slices)): for each of
    the ``slices`` contiguous slices of loss_mask [b, s], its masked positions in order, then
    its first unmasked ones. The sort is stable, so the choice is deterministic."""
    b, s = loss_mask.shape
    if s % slices:
        raise ValueError(f"sequence length {s} does not divide into {slices} sequence-parallel slices")
    width = s // slices
    k = min(limit, width)
    unmasked = (loss_mask.reshape(b, slices, width) == 0).to(torch.int8)
    order = torch.sort(unmasked, dim=2, stable=True).indices[:, :, :k]  # [b, slices, k] within each slice
    offsets = torch.arange(slices, device=loss_mask.device).view(1, slices, 1) * width
    return (order + offsets).reshape(b, slices * k)


def this_slice(positions: torch.Tensor, slices: int, slice_index: int, slice_width: int) -> torch.Tensor:
    """The positions of slice ``slice_index`` (of ``selected_positions``' output) as indices
    into that slice: [b, k]."""
    b = positions.shape[0]
    per_slice = positions.view(b, slices, -1)[:, slice_index]
    return per_slice - slice_index * slice_width


def gather_positions(hidden_states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """hidden_states [s, b, h] at positions [b, k] -> [k, b, h]."""
    index = positions.t().unsqueeze(-1).expand(-1, -1, hidden_states.shape[-1])
    return torch.gather(hidden_states, 0, index)


def scatter_losses(losses: torch.Tensor, positions: torch.Tensor, seq_length: int) -> torch.Tensor:
    """Per-position losses [b, n] at positions [b, n] -> [b, seq_length] (fp32): the head's
    losses where it ran, zero at the positions it skipped (whose loss mask is zero)."""
    b = losses.shape[0]
    full = torch.zeros(b, seq_length, dtype=torch.float32, device=losses.device)
    return full.scatter(1, positions, losses.float())
