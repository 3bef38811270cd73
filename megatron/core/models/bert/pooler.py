"""BERT's pooler: dense + tanh over one token (the [CLS] token) of the last hidden states."""

from __future__ import annotations

import torch

from megatron.core import tensor_parallel
from megatron.core.transformer.transformer_config import TransformerConfig


class Pooler(torch.nn.Module):
    """forward(hidden_states [s(/tp), b, h], sequence_index=0) -> pooled [b, h].

    Under sequence parallelism each tensor-parallel rank holds a slice of the sequence,
    so the full sequence is gathered first; the pooled output is then the same on every
    rank (and so are the gradients of ``dense``).
    """

    def __init__(self, hidden_size: int, config: TransformerConfig, tp_group):
        super().__init__()
        self.dense = torch.nn.Linear(hidden_size, hidden_size, dtype=config.params_dtype)
        if config.perform_initialization:
            with torch.no_grad():
                config.init_method(self.dense.weight)
                self.dense.bias.zero_()
        self.sequence_parallel = config.sequence_parallel
        self.tp_group = tp_group

    def forward(self, hidden_states: torch.Tensor, sequence_index: int = 0) -> torch.Tensor:
        if self.sequence_parallel:
            hidden_states = tensor_parallel.gather_from_sequence_parallel_region(
                hidden_states, self.tp_group, tensor_parallel_output_grad=False
            )
        return torch.tanh(self.dense(hidden_states[sequence_index]))
