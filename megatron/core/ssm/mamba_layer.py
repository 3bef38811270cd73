"""One Mamba layer of a hybrid stack: norm -> Mamba-2 mixer -> dropout-add to the residual."""

from __future__ import annotations

from typing import Optional

import torch

from megatron.core import process_groups
from megatron.core.fusions.fused_bias_dropout_add import get_bias_dropout_add
from megatron.core.ssm.mamba_config import MambaConfig
from megatron.core.ssm.mamba_mixer import MambaMixer
from megatron.core.transformer.torch_norm import build_norm
from megatron.core.transformer.transformer_config import TransformerConfig


class MambaLayer(torch.nn.Module):
    """forward(hidden_states [s(/tp), b, h], attention_mask=None, rotary_pos_emb=None,
    inference_context=None) -> (hidden_states [s(/tp), b, h], None). The mask and rotary
    arguments exist so the stack can call every layer kind alike; a Mamba layer is causal
    by construction. ``inference_context`` carries the recurrent state during generation."""

    def __init__(
        self,
        config: TransformerConfig,
        mamba_config: MambaConfig,
        layer_number: int = 1,
        pg_collection: Optional[process_groups.ProcessGroups] = None,
    ):
        super().__init__()
        self.config = config
        self.layer_number = layer_number
        self.norm = build_norm(config, config.hidden_size)
        self.mixer = MambaMixer(config, mamba_config, pg_collection=process_groups.resolve(pg_collection),
                                layer_number=layer_number)

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, rotary_pos_emb=None, inference_context=None):
        residual = hidden_states
        out = self.mixer(self.norm(hidden_states), inference_context=inference_context)
        bias_dropout_add = get_bias_dropout_add(self.training, self.config.bias_dropout_fusion)
        return bias_dropout_add(out, residual, self.config.hidden_dropout), None
