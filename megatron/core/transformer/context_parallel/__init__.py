"""Context parallelism without Transformer Engine: the sequence is split over CP ranks and
attention is exact over the whole sequence (p2p ring, all_gather, a2a, a2a+p2p)."""

from megatron.core.transformer.context_parallel.attention import (
    COMM_TYPES,
    ContextParallelAttention,
    resolve_comm_type,
)
from megatron.core.transformer.context_parallel.layout import (
    get_batch_on_this_cp_rank,
    get_pos_emb_on_this_cp_rank,
    load_balanced_indices,
)

__all__ = [
    "COMM_TYPES",
    "ContextParallelAttention",
    "resolve_comm_type",
    "get_batch_on_this_cp_rank",
    "get_pos_emb_on_this_cp_rank",
    "load_balanced_indices",
]
