"""Which tokens a context-parallel rank holds (the causal load-balanced split).

The sequence is cut into 2 x CP equal chunks; CP rank i keeps chunks i and 2CP-1-i, so
every rank has the same share of causal attention work. A rank's local sequence is those
two chunks, in that order. Positions stay global: a token's position is its index in the
full sequence.

A "segment" is a (start, length) run of global positions; a rank's local tokens are a
list of segments laid end to end. Attention masks are derived from segments in Python,
so no device sync is needed to decide which blocks are empty, full or partial.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

from megatron.core import process_groups

Segment = Tuple[int, int]


def load_balanced_chunk_ids(cp_rank: int, cp_size: int) -> Tuple[int, int]:
    """The two chunk indices (of 2 x cp_size) that CP rank ``cp_rank`` holds: (i, 2CP-1-i)."""
    return cp_rank, 2 * cp_size - 1 - cp_rank


def local_segments(cp_rank: int, cp_size: int, local_len: int) -> List[Segment]:
    """Global-position segments of a rank whose local sequence has ``local_len`` tokens."""
    if local_len % 2:
        raise ValueError(f"a context-parallel rank must hold an even number of tokens, got {local_len}")
    chunk = local_len // 2
    return [(c * chunk, chunk) for c in load_balanced_chunk_ids(cp_rank, cp_size)]


def segment_positions(segments: Sequence[Segment], device) -> torch.Tensor:
    """The global positions [sum of lengths] (int64) of tokens laid out as ``segments``."""
    return torch.cat([torch.arange(s, s + n, device=device) for s, n in segments])


def load_balanced_indices(seq_len: int, cp_rank: int, cp_size: int, device=None) -> torch.Tensor:
    """Indices into a full sequence of ``seq_len`` of the tokens CP rank ``cp_rank`` holds."""
    if seq_len % (2 * cp_size):
        raise ValueError(
            f"--seq-length {seq_len} must be a multiple of 2 x --context-parallel-size = {2 * cp_size}: "
            "pad the sequence or change the context-parallel size"
        )
    return segment_positions(local_segments(cp_rank, cp_size, seq_len // cp_size), device)


def slice_for_cp_rank(tensor: torch.Tensor, seq_dim: int, cp_rank: int, cp_size: int) -> torch.Tensor:
    """The load-balanced part of ``tensor`` along ``seq_dim`` (the full sequence) for this rank."""
    if cp_size == 1:
        return tensor
    index = load_balanced_indices(tensor.size(seq_dim), cp_rank, cp_size, tensor.device)
    return tensor.index_select(seq_dim, index)


def get_batch_on_this_cp_rank(batch: Dict[str, torch.Tensor], cp_group=None) -> Dict[str, torch.Tensor]:
    """Slice a micro-batch ([b, s] tensors: tokens, labels, loss_mask, position_ids) for this
    context-parallel rank, as Megatron's helper of the same name does.

    ``attention_mask`` ([b, 1, s, s]) keeps all key columns and only this rank's query
    rows. None values pass through. Position ids keep their global values.
    """
    cp = process_groups.group_size(cp_group)
    if cp == 1:
        return batch
    rank = process_groups.group_rank(cp_group)
    out = {}
    for key, value in batch.items():
        if value is None:
            out[key] = None
        elif key == "attention_mask":
            out[key] = slice_for_cp_rank(value, 2, rank, cp)
        else:
            out[key] = slice_for_cp_rank(value, 1, rank, cp)
    return out


def get_pos_emb_on_this_cp_rank(pos_emb: torch.Tensor, seq_dim: int, cp_group=None) -> torch.Tensor:
    """Rotary angles of this rank's global positions, from angles of the full sequence."""
    cp = process_groups.group_size(cp_group)
    return slice_for_cp_rank(pos_emb, seq_dim, process_groups.group_rank(cp_group), cp)
