"""Tied input/output embeddings across the first and last pipeline stage.

The first stage owns the word embedding; the last stage's output layer holds a second
copy of the same matrix (flagged ``shared_embedding``; it starts at zero, see
``LanguageModule.setup_embeddings_and_output_layer``). Summing both copies over the
embedding group once at setup makes them equal; ``finalize_model_grads`` then sums
their gradients every step, so they stay equal.
"""

from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist

from megatron.core.process_groups import ProcessGroups, group_size, resolve


def all_reduce_embedding_weights(weights: List[torch.Tensor], embd_group) -> None:
    """Forward: sum each tensor of ``weights`` in place over the embedding group (the first
    and last pipeline stage). Backward: not differentiable. No-op for a 1-rank group."""
    if embd_group is None or group_size(embd_group) == 1:
        return
    for weight in weights:
        dist.all_reduce(weight, group=embd_group)


def sync_tied_embedding_weights(model_chunks: List[torch.nn.Module], pg_collection: ProcessGroups = None) -> None:
    """Give the last stage's output weight the first stage's word-embedding values.

    Call once after building the chunks, before training. Only ranks in the embedding
    group take part; with one pipeline stage the weight is a single tensor already.
    """
    groups = resolve(pg_collection)
    if groups.size("pp") == 1 or groups.embd is None:
        return
    weights = [
        param.data
        for chunk in model_chunks
        for param in chunk.parameters()
        if getattr(param, "shared_embedding", False)
    ]
    if len(weights) > 1:
        raise ValueError(
            f"found {len(weights)} tied-embedding weights on pipeline rank {groups.rank('pp')}; "
            "a stage holds at most one (the word embedding or the output layer)"
        )
    with torch.no_grad():
        all_reduce_embedding_weights(weights, groups.embd)
