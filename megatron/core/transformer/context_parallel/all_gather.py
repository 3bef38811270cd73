"""K/V all-gather over the context-parallel group (--cp-comm-type all_gather).

Every rank gathers the whole sequence's K/V, puts it in position order, and attends its
own two query chunks to the keys they can see (a causal chunk only needs the keys up to
its last position). Backward: the gathered K/V gradients are summed over ranks and each
rank keeps its own tokens' share (a reduce-scatter).
"""

from __future__ import annotations

import torch

from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region


def gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather along dim 0 over ``group`` (rank order); backward reduce-scatters
    (the sequence-parallel gather mapping, applied to the context-parallel group)."""
    return gather_from_sequence_parallel_region(x, group, tensor_parallel_output_grad=True)
