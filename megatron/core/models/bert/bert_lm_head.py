"""BERT's masked-LM head transform: dense -> GeLU -> norm, before the tied output layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron.core.transformer.activations import openai_gelu
from megatron.core.transformer.torch_norm import build_norm
from megatron.core.transformer.transformer_config import TransformerConfig


class BertLMHead(torch.nn.Module):
    """forward(hidden_states [s(/tp), b, h]) -> [s(/tp), b, h].

    Works per token, so it runs on the sequence-parallel shard as it is; its weights then
    see only that shard, so they carry ``sequence_parallel`` for the gradient all-reduce,
    like the norms'. GeLU is exact unless --openai-gelu (Megatron's BERT head does the same).
    """

    def __init__(self, hidden_size: int, config: TransformerConfig):
        super().__init__()
        self.dense = torch.nn.Linear(hidden_size, hidden_size, dtype=config.params_dtype)
        if config.perform_initialization:
            with torch.no_grad():
                config.init_method(self.dense.weight)
                self.dense.bias.zero_()
        for param in self.dense.parameters():
            param.sequence_parallel = config.sequence_parallel
        self.activation = openai_gelu if config.openai_gelu else F.gelu
        self.layer_norm = build_norm(config, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(self.activation(self.dense(hidden_states)))
