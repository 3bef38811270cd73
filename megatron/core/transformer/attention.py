"""Self-attention: fused grouped QKV projection, optional QK norm, RoPE, core attention,
output projection.

Fused QKV layout (Megatron's, checkpoint_version >= 2): the output rows of
``linear_qkv`` are grouped per query group, ``[ng, (np/ng + 2) * hn]``: for each group
its np/ng query heads, then its key head, then its value head. Tensor parallelism splits
whole groups, so each rank's contiguous shard is the same layout with ng/tp groups.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from megatron.core import process_groups, tensor_parallel
from megatron.core.models.common.embeddings.rotary_pos_embedding import apply_rotary_pos_emb
from megatron.core.transformer.sliding_window import skips_rope
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.torch_norm import L2Norm, build_norm
from megatron.core.transformer.transformer_config import TransformerConfig

# core attention's q/k/v differ per tensor-parallel rank, so recompute keeps them whole there
_KEEP_WHOLE_ON_EACH_RANK = False


class SelfAttention(torch.nn.Module):
    """Multi-head / grouped-query self-attention of one transformer layer.

    forward(hidden_states [s, b, h] (or [s/tp, b, h] under sequence parallelism),
    attention_mask (None or bool [b or 1, 1, s, s], True = masked),
    rotary_pos_emb (None, freqs [s, 1, 1, d_rot], or a (q_freqs, k_freqs) pair),
    inference_context (None in training; during generation a KV cache from
    ``megatron.core.inference.contexts`` that stores the new keys/values and attends over
    the cached ones))
    -> (output [s(/tp), b, h], bias [h] or None). The bias of ``linear_proj`` is returned
    unadded so the layer can fuse bias + dropout + residual.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.causal,
        pg_collection: Optional[process_groups.ProcessGroups] = None,
    ):
        super().__init__()
        self.config = config
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        groups = process_groups.resolve(pg_collection)
        self.tp_group = groups.tp
        tp = process_groups.group_size(self.tp_group)
        self.hidden_size_per_attention_head = config.kv_channels
        self.num_attention_heads_per_partition = config.num_attention_heads // tp
        self.num_query_groups_per_partition = config.num_query_groups // tp
        query_projection_size = config.kv_channels * config.num_attention_heads
        kv_projection_size = config.kv_channels * config.num_query_groups

        self.linear_qkv = tensor_parallel.ColumnParallelLinear(
            config.hidden_size,
            query_projection_size + 2 * kv_projection_size,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=config.add_bias_linear or config.add_qkv_bias,
            skip_bias_add=False,
            tp_group=self.tp_group,
        )
        if config.qk_l2_norm:
            # Parameter-free, so nothing to mark for tensor parallelism. Applied where the
            # q/k layernorm is, before RoPE: a rotation keeps each head's norm, so the
            # order does not matter without YaRN's magnitude scaling.
            self.q_layernorm = L2Norm(config.kv_channels, eps=config.layernorm_epsilon)
            self.k_layernorm = L2Norm(config.kv_channels, eps=config.layernorm_epsilon)
        elif config.qk_layernorm:
            self.q_layernorm = build_norm(config, config.kv_channels)
            self.k_layernorm = build_norm(config, config.kv_channels)
            # Each tensor-parallel rank normalizes different heads with the same weight,
            # so the weight's grad is partial per rank and must be summed over the group,
            # exactly like sequence-parallel norm weights: reuse that marker.
            for param in (*self.q_layernorm.parameters(), *self.k_layernorm.parameters()):
                param.sequence_parallel = tp > 1
        else:
            self.q_layernorm = None
            self.k_layernorm = None
        self.core_attention = DotProductAttention(
            config, layer_number, attn_mask_type, attention_type="self", pg_collection=groups
        )
        self.checkpoint_core_attention = config.recompute_granularity == "selective"
        self.linear_proj = tensor_parallel.RowParallelLinear(
            query_projection_size,
            config.hidden_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=config.add_bias_linear,
            input_is_parallel=True,
            skip_bias_add=True,
            tp_group=self.tp_group,
        )

    def get_query_key_value_tensors(self, hidden_states: torch.Tensor):
        """[s(/tp), b, h] -> q [s, b, np, hn], k [s, b, ng, hn], v [s, b, ng, hn] (this rank's heads)."""
        mixed_qkv, _ = self.linear_qkv(hidden_states)
        ng = self.num_query_groups_per_partition
        per_group = self.num_attention_heads_per_partition // ng
        hn = self.hidden_size_per_attention_head
        mixed_qkv = mixed_qkv.view(*mixed_qkv.shape[:-1], ng, (per_group + 2) * hn)
        query, key, value = torch.split(mixed_qkv, [per_group * hn, hn, hn], dim=3)
        query = query.reshape(*query.shape[:2], ng * per_group, hn)
        if self.q_layernorm is not None:
            query = self.q_layernorm(query)
            key = self.k_layernorm(key)
        return query, key, value

    def _core_attention(self, query, key, value, attention_mask, attn_mask_type, query_offset=None):
        if not self.checkpoint_core_attention or not self.training:
            return self.core_attention(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                       query_offset=query_offset)

        def run(q, k, v):
            return self.core_attention(q, k, v, attention_mask, attn_mask_type=attn_mask_type)

        return tensor_parallel.random.checkpoint(run, _KEEP_WHOLE_ON_EACH_RANK, query, key, value)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        rotary_pos_emb=None,
        attn_mask_type: Optional[AttnMaskType] = None,
        inference_context=None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        query, key, value = self.get_query_key_value_tensors(hidden_states)
        if rotary_pos_emb is not None and not skips_rope(self.config, self.layer_number):
            q_freqs, k_freqs = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb, rotary_pos_emb)
            query = apply_rotary_pos_emb(query, q_freqs, self.config)
            key = apply_rotary_pos_emb(key, k_freqs, self.config)
        if inference_context is not None:
            # Generation: the context (megatron.core.inference) stores this step's keys and
            # values and runs core attention over everything cached for each sequence.
            context = inference_context.attend(self.layer_number, query, key, value, self._core_attention)
        else:
            context = self._core_attention(query, key, value, attention_mask, attn_mask_type)
        return self.linear_proj(context)
