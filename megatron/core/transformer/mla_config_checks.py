"""Validation of the multi-latent attention fields of a TransformerConfig.

Called from ``TransformerConfig.__post_init__``. Each refusal names the flag, the value and
the fix: combinations Megatron-LM refuses (grouped-query attention) and the ones this
implementation does not build (YaRN for standard attention).
"""

from __future__ import annotations


def _positive(flag: str, value) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{flag} must be a positive integer with --multi-latent-attention, got {value!r}")


def _check_rope_type(config) -> None:
    if config.rope_type not in (None, "rope", "yarn"):
        raise ValueError(f"--rope-type must be rope or yarn, got {config.rope_type!r}")
    if config.multi_latent_attention:
        return
    if config.rope_type == "yarn" or config.rotary_scaling_factor != 1.0:
        raise ValueError(
            "--rope-type yarn and --rotary-scaling-factor act only with --multi-latent-attention here "
            "(YaRN for standard attention is not implemented): add --multi-latent-attention or drop them"
        )


def check_mla_config(config) -> None:
    """Raise ValueError unless ``config`` describes a multi-latent attention (or YaRN setting)
    this package builds."""
    _check_rope_type(config)
    if not config.multi_latent_attention:
        return
    if config.q_lora_rank is not None:
        _positive("--q-lora-rank", config.q_lora_rank)
    _positive("--kv-lora-rank", config.kv_lora_rank)
    _positive("--qk-head-dim", config.qk_head_dim)
    _positive("--v-head-dim", config.v_head_dim)
    _positive("--qk-pos-emb-head-dim", config.qk_pos_emb_head_dim)
    if config.qk_pos_emb_head_dim % 2:
        raise ValueError(
            f"--qk-pos-emb-head-dim must be even (RoPE rotates pairs of dims), got {config.qk_pos_emb_head_dim}"
        )
    if config.num_query_groups != config.num_attention_heads:
        raise ValueError(
            "--multi-latent-attention cannot be combined with grouped-query attention "
            f"(--num-query-groups {config.num_query_groups} vs --num-attention-heads {config.num_attention_heads}): "
            "drop --group-query-attention and --num-query-groups"
        )
    if config.rotary_scaling_factor < 1.0:
        raise ValueError(f"--rotary-scaling-factor must be >= 1 (YaRN extends the context), got {config.rotary_scaling_factor}")
    if config.rotary_interleaved:
        raise ValueError(
            "--rotary-interleaved is not supported with --multi-latent-attention (its RoPE already pairs "
            "adjacent dims, as DeepSeek's does): drop --rotary-interleaved"
        )
