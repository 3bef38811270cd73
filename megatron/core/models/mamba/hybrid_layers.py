"""The non-Mamba layers of a hybrid stack: attention alone and MLP (or MoE) alone.

In a hybrid pattern each position holds one sublayer, so a ``*`` layer is a pre-norm
self-attention with its residual and a ``-``/``E`` layer a pre-norm MLP with its residual.
Parameter names are those of a transformer layer's halves (``input_layernorm``,
``self_attention``; ``pre_mlp_layernorm``, ``mlp``), as in Megatron's hybrid models.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron.core import process_groups
from megatron.core.fusions.fused_bias_dropout_add import get_bias_dropout_add
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.torch_norm import build_norm
from megatron.core.transformer.transformer_config import TransformerConfig


class AttentionLayer(torch.nn.Module):
    """forward(hidden_states [s(/tp), b, h], attention_mask=None, rotary_pos_emb=None,
    inference_context=None) -> (hidden_states, None): x + attention(norm(x)); during
    generation ``inference_context`` is the KV cache."""

    def __init__(self, config: TransformerConfig, layer_number: int,
                 pg_collection: Optional[process_groups.ProcessGroups] = None):
        super().__init__()
        self.config, self.layer_number = config, layer_number
        self.input_layernorm = build_norm(config, config.hidden_size)
        self.self_attention = SelfAttention(config, layer_number, AttnMaskType.causal, pg_collection=pg_collection)

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, rotary_pos_emb=None, inference_context=None):
        out = self.self_attention(self.input_layernorm(hidden_states), attention_mask=attention_mask,
                                  rotary_pos_emb=rotary_pos_emb, inference_context=inference_context)
        bias_dropout_add = get_bias_dropout_add(self.training, self.config.bias_dropout_fusion)
        return bias_dropout_add(out, hidden_states, self.config.hidden_dropout), None


class MLPLayer(torch.nn.Module):
    """forward(hidden_states, attention_mask=None, rotary_pos_emb=None, inference_context=None)
    -> (hidden_states, None): x + mlp(norm(x)); ``moe`` builds an MoE layer (--num-experts)
    instead. An MLP keeps no state between generation steps."""

    def __init__(self, config: TransformerConfig, layer_number: int, moe: bool = False,
                 pg_collection: Optional[process_groups.ProcessGroups] = None):
        super().__init__()
        self.config, self.layer_number = config, layer_number
        self.pre_mlp_layernorm = build_norm(config, config.hidden_size)
        if moe:
            if not config.num_moe_experts:
                raise ValueError("an 'E' layer in --hybrid-layer-pattern needs --num-experts")
            self.mlp = MoELayer(config, layer_number, pg_collection=pg_collection)
        else:
            self.mlp = MLP(config, pg_collection=pg_collection)

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, rotary_pos_emb=None, inference_context=None):
        bias_dropout_add = get_bias_dropout_add(self.training, self.config.bias_dropout_fusion)
        return bias_dropout_add(self.mlp(self.pre_mlp_layernorm(hidden_states)), hidden_states,
                                self.config.hidden_dropout), None
