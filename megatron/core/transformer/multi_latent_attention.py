"""Multi-latent attention (DeepSeek-V2/V3), Megatron-Core's ``MLASelfAttention``.

Queries come from ``linear_q_proj`` [h -> n * (dq + dr)], or, with ``q_lora_rank``, from
``linear_q_down_proj`` [h -> q_lora_rank], ``q_layernorm`` and ``linear_q_up_proj``.
``linear_kv_down_proj`` [h -> kv_lora_rank + dr] gives the key/value latent and one RoPE
key part shared by every head; the latent goes through ``kv_layernorm`` and
``linear_kv_up_proj`` [kv_lora_rank -> n * (dq + dv)], each head's rows being its keys
then its values. (dq, dr, dv = qk_head_dim, qk_pos_emb_head_dim, v_head_dim.) RoPE
rotates only the last dr dims of each query head and the shared key part, with YaRN's
frequencies and cos/sin scale unless --rope-type rope; the softmax scale is 1/sqrt(dq + dr)
times YaRN's mscale_all_dim factor squared (all factors are 1 without rotary scaling).

Tensor parallelism splits heads: the up projections (and ``linear_q_proj``) are column-
parallel, ``linear_proj`` is row-parallel, and the down projections and their norms are
replicated (as Transformer Engine's "duplicated" linears in Megatron-LM). Without sequence
parallelism every rank computes the whole latent, so their gradients are complete on each
rank; with it each rank compresses its own tokens, the up projections all-gather the latents
along the sequence, and the replicated weights' gradients are summed over the group.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from megatron.core import process_groups, tensor_parallel
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding, apply_rotary_pos_emb
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import YarnRotaryEmbedding, yarn_get_mscale
from megatron.core.tensor_parallel.layers import _param_device
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.torch_norm import build_norm
from megatron.core.transformer.transformer_config import TransformerConfig

# core attention's q/k/v differ per tensor-parallel rank, so recompute keeps them whole there
_KEEP_WHOLE_ON_EACH_RANK = False


def uses_yarn(config: TransformerConfig) -> bool:
    """Whether MLA's RoPE is YaRN (--rope-type yarn, or unset as in Megatron-LM)."""
    return config.rope_type != "rope"


def mla_rotary_embedding(config: TransformerConfig, rotary_base: float) -> RotaryEmbedding:
    """The rotary embedding of the qk_pos_emb_head_dim dims: YaRN's, or plain RoPE's."""
    if not uses_yarn(config):
        return RotaryEmbedding(config.qk_pos_emb_head_dim, 1.0, rotary_base=rotary_base)
    return YarnRotaryEmbedding(
        config.qk_pos_emb_head_dim, rotary_base=rotary_base, scaling_factor=config.rotary_scaling_factor,
        original_max_position_embeddings=config.yarn_original_max_position_embeddings,
        beta_fast=config.yarn_beta_fast, beta_slow=config.yarn_beta_slow, mscale=config.mscale,
        mscale_all_dim=config.mscale_all_dim, correction_range_round_to_int=config.yarn_correction_range_round_to_int,
    )


class ReplicatedLinear(torch.nn.Module):
    """Y = X W^T with the whole W on every tensor-parallel rank (no communication): input
    [..., in] is whatever this rank holds ([s/tp, b, h] under sequence parallelism).

    The weight is drawn from the default generator with ``init_method`` on every rank, so
    ranks that share a seed hold the same weight. forward(input [..., in]) ->
    (output [..., out], None), the parallel linears' return shape.
    """

    def __init__(self, input_size: int, output_size: int, *, config: TransformerConfig, init_method):
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.weight = torch.nn.Parameter(
            torch.empty(output_size, input_size, device=_param_device(config), dtype=config.params_dtype)
        )
        if config.perform_initialization and self.weight.device.type != "meta":
            with torch.no_grad():
                init_method(self.weight)
        # Under sequence parallelism each rank projects only its tokens: the weight's gradient
        # is partial per rank and is summed over the group, like sequence-parallel norms'.
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, input_: torch.Tensor) -> Tuple[torch.Tensor, None]:
        return F.linear(input_, self.weight), None

    def extra_repr(self) -> str:
        return f"in_features={self.input_size}, out_features={self.output_size}, replicated"


def _rope_deinterleaved(t: torch.Tensor, freqs: torch.Tensor, config: TransformerConfig,
                        mscale: float = 1.0) -> torch.Tensor:
    """RoPE as DeepSeek applies it: the dims are stored as adjacent (even, odd) pairs, so
    they are regrouped to [evens ; odds] before the half-split rotation (cos/sin times mscale)."""
    t = torch.cat((t[..., 0::2], t[..., 1::2]), dim=-1)
    return apply_rotary_pos_emb(t, freqs, config, rotary_interleaved=False, mscale=mscale)


def _pad_to_one_width(query, key, value):
    """Scores use dq + dr dims, the context dv; the attention backends and the KV caches take
    one head width, so the narrower side is zero-padded (zeros add nothing to q.k, and the
    context's padded dims are dropped afterwards)."""
    qk_width, v_width = query.shape[-1], value.shape[-1]
    if v_width < qk_width:
        value = F.pad(value, (0, qk_width - v_width))
    elif qk_width < v_width:
        query = F.pad(query, (0, v_width - qk_width))
        key = F.pad(key, (0, v_width - qk_width))
    return query, key, value


class MLASelfAttention(torch.nn.Module):
    """Multi-latent self-attention of one transformer layer.

    forward(hidden_states [s, b, h] (or [s/tp, b, h] under sequence parallelism),
    attention_mask (None or bool [b or 1, 1, s, s], True = masked), rotary_pos_emb (None or
    freqs [s, 1, 1, qk_pos_emb_head_dim]), inference_context (None in training; during
    generation a KV cache of ``megatron.core.inference.contexts``, given the expanded keys
    and padded values)) -> (output [s(/tp), b, h], bias [h] or None), like ``SelfAttention``.
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
        self.num_heads_per_partition = config.num_attention_heads // tp
        self.q_head_dim = config.qk_head_dim + config.qk_pos_emb_head_dim
        n = config.num_attention_heads

        def column(in_size, out_size):
            return tensor_parallel.ColumnParallelLinear(
                in_size, out_size, config=config, init_method=config.init_method, gather_output=False,
                bias=False, tp_group=self.tp_group,
            )

        def norm(size):
            return build_norm(config, size) if config.qk_layernorm else None

        if config.q_lora_rank is None:
            self.linear_q_proj = column(config.hidden_size, n * self.q_head_dim)
        else:
            self.linear_q_down_proj = ReplicatedLinear(
                config.hidden_size, config.q_lora_rank, config=config, init_method=config.init_method
            )
            self.q_layernorm = norm(config.q_lora_rank)
            self.linear_q_up_proj = column(config.q_lora_rank, n * self.q_head_dim)
        self.linear_kv_down_proj = ReplicatedLinear(
            config.hidden_size, config.kv_lora_rank + config.qk_pos_emb_head_dim,
            config=config, init_method=config.init_method,
        )
        self.kv_layernorm = norm(config.kv_lora_rank)
        self.linear_kv_up_proj = column(config.kv_lora_rank, n * (config.qk_head_dim + config.v_head_dim))
        # YaRN: cos/sin of the rotated dims are scaled by rope_mscale, and every score by
        # mscale_all_dim's factor squared (both 1 without rotary scaling).
        factor = config.rotary_scaling_factor
        self.rope_mscale = (yarn_get_mscale(factor, config.mscale) / yarn_get_mscale(factor, config.mscale_all_dim)
                            if uses_yarn(config) else 1.0)
        mscale = yarn_get_mscale(factor, config.mscale_all_dim)
        self.softmax_scale = mscale * mscale / math.sqrt(self.q_head_dim)
        self.core_attention = DotProductAttention(
            config, layer_number, attn_mask_type, attention_type="self",
            softmax_scale=self.softmax_scale, pg_collection=groups,
        )
        self.checkpoint_core_attention = config.recompute_granularity == "selective"
        self.linear_proj = tensor_parallel.RowParallelLinear(
            n * config.v_head_dim, config.hidden_size, config=config, init_method=config.output_layer_init_method,
            bias=config.add_bias_linear, input_is_parallel=True, skip_bias_add=True, tp_group=self.tp_group,
        )

    def _queries(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[s, b, h] -> [s, b, np, dq + dr] (this rank's heads)."""
        if self.config.q_lora_rank is None:
            q, _ = self.linear_q_proj(hidden_states)
        else:
            q_compressed, _ = self.linear_q_down_proj(hidden_states)
            if self.q_layernorm is not None:
                q_compressed = self.q_layernorm(q_compressed)
            q, _ = self.linear_q_up_proj(q_compressed)
        return q.view(*q.shape[:2], self.num_heads_per_partition, self.q_head_dim)

    def get_query_key_value_tensors(self, hidden_states: torch.Tensor, rotary_pos_emb=None):
        """[s, b, h] -> q, k [s, b, np, dq + dr] (RoPE applied), v [s, b, np, dv]."""
        c = self.config
        query = self._queries(hidden_states)
        kv_combined, _ = self.linear_kv_down_proj(hidden_states)
        kv_compressed, k_pos_emb = torch.split(kv_combined, [c.kv_lora_rank, c.qk_pos_emb_head_dim], dim=-1)
        if self.kv_layernorm is not None:
            kv_compressed = self.kv_layernorm(kv_compressed)
        kv, _ = self.linear_kv_up_proj(kv_compressed)
        kv = kv.view(*kv.shape[:2], self.num_heads_per_partition, c.qk_head_dim + c.v_head_dim)
        k_no_pe, value = torch.split(kv, [c.qk_head_dim, c.v_head_dim], dim=-1)
        q_no_pe, q_pos_emb = torch.split(query, [c.qk_head_dim, c.qk_pos_emb_head_dim], dim=-1)
        # [s, b, 1, dr]: one RoPE key part for all heads. Each rank uses it for its own heads
        # only, so its gradient is partial per rank: summed over the group on the way back
        # (under sequence parallelism by the reduce-scatter that undoes the gather).
        if self.config.sequence_parallel:
            k_pos_emb = tensor_parallel.gather_from_sequence_parallel_region(k_pos_emb, self.tp_group)
        else:
            k_pos_emb = tensor_parallel.copy_to_tensor_model_parallel_region(k_pos_emb, self.tp_group)
        k_pos_emb = k_pos_emb.unsqueeze(2)
        if rotary_pos_emb is not None:
            q_pos_emb = _rope_deinterleaved(q_pos_emb, rotary_pos_emb, c, self.rope_mscale)
            k_pos_emb = _rope_deinterleaved(k_pos_emb, rotary_pos_emb, c, self.rope_mscale)
        query = torch.cat((q_no_pe, q_pos_emb), dim=-1)
        key = torch.cat((k_no_pe, k_pos_emb.expand(-1, -1, self.num_heads_per_partition, -1)), dim=-1)
        return query, key, value

    def _core_attention(self, query, key, padded_value, attention_mask, attn_mask_type, query_offset=None):
        """q, k, v of one head width (``_pad_to_one_width``) -> context [sq, b, np * dv]."""
        dv = self.config.v_head_dim

        def run(q, k, v):
            out = self.core_attention(q, k, v, attention_mask, attn_mask_type=attn_mask_type, query_offset=query_offset)
            return out.view(*out.shape[:2], self.num_heads_per_partition, -1)[..., :dv]

        if self.checkpoint_core_attention and self.training:
            context = tensor_parallel.random.checkpoint(run, _KEEP_WHOLE_ON_EACH_RANK, query, key, padded_value)
        else:
            context = run(query, key, padded_value)
        return context.reshape(*context.shape[:2], -1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        rotary_pos_emb=None,
        attn_mask_type: Optional[AttnMaskType] = None,
        inference_context=None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if isinstance(rotary_pos_emb, tuple):
            rotary_pos_emb = rotary_pos_emb[0]
        query, key, value = self.get_query_key_value_tensors(hidden_states, rotary_pos_emb)
        query, key, padded_value = _pad_to_one_width(query, key, value)
        if inference_context is not None:
            # Generation: the context caches the expanded keys and (padded) values of every
            # head, as for standard attention; caching the latents instead is not implemented.
            context = inference_context.attend(self.layer_number, query, key, padded_value, self._core_attention)
        else:
            context = self._core_attention(query, key, padded_value, attention_mask, attn_mask_type)
        return self.linear_proj(context)
