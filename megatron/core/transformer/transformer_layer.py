"""One pre-norm transformer layer: norm -> self-attention -> bias-dropout-add ->
norm -> MLP (or MoE layer, per --moe-layer-freq) -> bias-dropout-add.

With ``transformer_block_type='post_ln'`` (the original BERT) the norms move after the
residual adds instead: self-attention -> bias-dropout-add -> post_att_layernorm -> MLP ->
bias-dropout-add -> post_mlp_layernorm.

Bias-dropout-add is one fused kernel unless --no-bias-dropout-fusion
(``fusions.fused_bias_dropout_add``); in a pre-norm layer with fused norms the attention's
bias-dropout-add and the MLP's norm are one region (``fusions.fused_bias_dropout_add_norm``),
and so are the MLP's bias-dropout-add and the next layer's input norm when a block runs
its layers in a chain (``forward``'s ``next_norm`` and ``normed_input``)."""

from __future__ import annotations

from typing import Optional

import torch

from megatron.core import process_groups
from megatron.core.fusions.fused_bias_dropout_add import get_bias_dropout_add
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.multi_latent_attention import MLASelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_layer_pattern import is_moe_layer
from megatron.core.transformer.torch_norm import build_norm
from megatron.core.transformer.transformer_config import TransformerConfig


class TransformerLayer(torch.nn.Module):
    """forward(hidden_states [s(/tp), b, h], attention_mask=None, rotary_pos_emb=None,
    inference_context=None (a KV cache during generation)) -> (hidden_states [s(/tp), b, h], context=None).

    ``layer_number`` is 1-based and global (it includes the pipeline stage's offset);
    attention uses it for --apply-query-key-layer-scaling. With
    apply_residual_connection_post_layernorm the residual is taken after each norm.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int = 1,
        hidden_dropout: Optional[float] = None,
        pg_collection: Optional[process_groups.ProcessGroups] = None,
        attn_mask_type: AttnMaskType = AttnMaskType.causal,
    ):
        super().__init__()
        self.config = config
        self.layer_number = layer_number
        self.hidden_dropout = config.hidden_dropout if hidden_dropout is None else hidden_dropout
        groups = process_groups.resolve(pg_collection)
        self.post_ln = config.transformer_block_type == "post_ln"
        # Post-norm layers hold no pre-norms (identity, no parameters), as NeMo's do.
        pre_norm = torch.nn.Identity if self.post_ln else (lambda: build_norm(config, config.hidden_size))
        self.input_layernorm = pre_norm()
        attention = MLASelfAttention if config.multi_latent_attention else SelfAttention
        self.self_attention = attention(config, layer_number, attn_mask_type, pg_collection=groups)
        self.pre_mlp_layernorm = pre_norm()
        if self.post_ln:
            self.post_att_layernorm = build_norm(config, config.hidden_size)
            self.post_mlp_layernorm = build_norm(config, config.hidden_size)
        if is_moe_layer(config, layer_number):
            self.mlp = MoELayer(config, layer_number, pg_collection=groups)
        else:
            self.mlp = MLP(config, pg_collection=groups)
        # The attention's bias-dropout-add and the MLP's norm as one region: the norm reads
        # the new residual stream where the add leaves it (fused_bias_dropout_add_norm).
        self.fuse_add_and_mlp_norm = (
            not self.post_ln and config.bias_dropout_fusion and getattr(self.pre_mlp_layernorm, "fused", False)
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        rotary_pos_emb=None,
        inference_context=None,
        normed_input: Optional[torch.Tensor] = None,
        next_norm: Optional[torch.nn.Module] = None,
    ):
        """-> (hidden_states, None), or (hidden_states, next_norm(hidden_states)) with ``next_norm``.

        A block chains its layers through the last two arguments: ``next_norm`` (the next
        layer's input norm, see ``chains_into``) is computed in one region with this layer's
        last bias-dropout-add, and the next layer takes the result as ``normed_input``
        instead of normalizing ``hidden_states`` again."""
        post_ln_residual = self.config.apply_residual_connection_post_layernorm
        bias_dropout_add_fn = get_bias_dropout_add(self.training, self.config.bias_dropout_fusion)
        normed = self.input_layernorm(hidden_states) if normed_input is None else normed_input
        residual = normed if post_ln_residual else hidden_states
        attention_out = self.self_attention(
            normed, attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb, inference_context=inference_context
        )
        if self.fuse_add_and_mlp_norm:
            hidden_states, normed = self.pre_mlp_layernorm(
                attention_out[0], residual, self.hidden_dropout, self.training, x_bias=attention_out[1])
        else:
            hidden_states = bias_dropout_add_fn(attention_out, residual, self.hidden_dropout)
            if self.post_ln:
                hidden_states = self.post_att_layernorm(hidden_states)
            normed = self.pre_mlp_layernorm(hidden_states)
        residual = normed if post_ln_residual else hidden_states
        mlp_out = self.mlp(normed)
        if next_norm is not None:
            return next_norm(mlp_out[0], residual, self.hidden_dropout, self.training, x_bias=mlp_out[1])
        hidden_states = bias_dropout_add_fn(mlp_out, residual, self.hidden_dropout)
        if self.post_ln:
            hidden_states = self.post_mlp_layernorm(hidden_states)
        return hidden_states, None

    def chains_into(self, following: torch.nn.Module) -> bool:
        """Whether this layer's last bias-dropout-add can be fused with ``following``'s input
        norm (the same fused region as the attention's add and the MLP's norm)."""
        return (self.fuse_add_and_mlp_norm and isinstance(following, TransformerLayer)
                and getattr(following.input_layernorm, "fused", False))
