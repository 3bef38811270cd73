"""Hugging Face DeepSeek-V3 (``DeepseekV3ForCausalLM``, "deepseek_v3") <-> GPTModel pieces.

The rest of the model (embeddings, norms, dense SwiGLU MLPs, routed experts, output) has the
Llama/Qwen-MoE key layout and goes through ``hf_mapping``; this module holds what differs.

Layout facts:
- Multi-latent attention maps one to one, no reshuffling: ``q_proj`` (or ``q_a_proj``,
  ``q_a_layernorm``, ``q_b_proj``), ``kv_a_proj_with_mqa``, ``kv_a_layernorm``,
  ``kv_b_proj``, ``o_proj`` are Megatron's ``linear_q_proj`` (or ``linear_q_down_proj``,
  ``q_layernorm``, ``linear_q_up_proj``), ``linear_kv_down_proj``, ``kv_layernorm``,
  ``linear_kv_up_proj``, ``linear_proj``. Both keep each query head as [nope ; rope] dims,
  each kv_b head as [k_nope ; v], and kv_a as [latent ; shared rope key].
- HF's ``rope_interleave=True`` rotates adjacent pairs of the rope dims, which is what
  Megatron's multi-latent attention does with its (default) non-interleaved RoPE.
- HF's YaRN ``rope_parameters`` (factor, original_max_position_embeddings, beta_fast/slow,
  mscale, mscale_all_dim, truncate) are Megatron's --rotary-scaling-factor and --yarn-* /
  --mscale* flags; without both mscales HF scales cos/sin by 0.1 ln(factor) + 1, which is
  Megatron's --mscale 1 --mscale-all-dim 0.
- The router is a sigmoid router whose ``e_score_correction_bias`` is Megatron's expert bias
  (``mlp.router.expert_bias``); groups (n_group / topk_group) are Megatron's group-limited
  top-k, ``routed_scaling_factor`` its --moe-router-topk-scaling-factor; the ungated shared
  experts (``mlp.shared_experts``) are Megatron's ``mlp.shared_experts`` MLP.
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

# (HF name under self_attn., Megatron name under self_attention.) of the weights present
# with and without a query down projection.
_MLA_COMMON = (
    ("kv_a_proj_with_mqa", "linear_kv_down_proj"),
    ("kv_a_layernorm", "kv_layernorm"),
    ("kv_b_proj", "linear_kv_up_proj"),
    ("o_proj", "linear_proj"),
)
_MLA_Q_LORA = (("q_a_proj", "linear_q_down_proj"), ("q_a_layernorm", "q_layernorm"), ("q_b_proj", "linear_q_up_proj"))
_MLA_Q_DIRECT = (("q_proj", "linear_q_proj"),)


def _mla_names(q_lora_rank):
    return (_MLA_Q_DIRECT if q_lora_rank is None else _MLA_Q_LORA) + _MLA_COMMON


def mla_hf_to_megatron(sd, hf_attn: str, ours: str, q_lora_rank) -> Dict[str, torch.Tensor]:
    """One layer's attention: HF keys under ``hf_attn`` -> ours under ``ours`` (sd: a reader)."""
    return {f"{ours}{mine}.weight": sd.pop(f"{hf_attn}{theirs}.weight") for theirs, mine in _mla_names(q_lora_rank)}


def mla_megatron_to_hf(sd, ours: str, hf_attn: str, q_lora_rank) -> Dict[str, torch.Tensor]:
    """Inverse of ``mla_hf_to_megatron``."""
    return {f"{hf_attn}{theirs}.weight": sd.pop(f"{ours}{mine}.weight") for theirs, mine in _mla_names(q_lora_rank)}


def deepseek_moe_extras_to_megatron(sd, src: str, dst: str) -> Dict[str, torch.Tensor]:
    """An MoE layer's expert bias and ungated shared experts, HF -> Megatron."""
    hf = src + "mlp.shared_experts."
    return {
        dst + "mlp.router.expert_bias": sd.pop(src + "mlp.gate.e_score_correction_bias"),
        dst + "mlp.shared_experts.linear_fc1.weight": torch.cat(
            (sd.pop(hf + "gate_proj.weight"), sd.pop(hf + "up_proj.weight")), dim=0
        ),
        dst + "mlp.shared_experts.linear_fc2.weight": sd.pop(hf + "down_proj.weight"),
    }


def deepseek_moe_extras_to_hf(sd, src: str, dst: str) -> Dict[str, torch.Tensor]:
    """Inverse of ``deepseek_moe_extras_to_megatron``."""
    gate, up = torch.chunk(sd.pop(src + "mlp.shared_experts.linear_fc1.weight"), 2, dim=0)
    hf = dst + "mlp.shared_experts."
    return {
        dst + "mlp.gate.e_score_correction_bias": sd.pop(src + "mlp.router.expert_bias"),
        hf + "gate_proj.weight": gate.clone(),
        hf + "up_proj.weight": up.clone(),
        hf + "down_proj.weight": sd.pop(src + "mlp.shared_experts.linear_fc2.weight"),
    }


def _refuse_unsupported(c: dict) -> None:
    if c.get("hidden_act", "silu") != "silu":
        raise ValueError(f"deepseek_v3 hidden_act {c.get('hidden_act')!r} does not convert: only silu (SwiGLU)")
    if c.get("attention_bias"):
        raise ValueError("deepseek_v3 with attention_bias=True does not convert: Megatron's MLA has no biases")
    if not c.get("rope_interleave", True):
        raise ValueError("deepseek_v3 with rope_interleave=False does not convert: Megatron's MLA rotates "
                         "adjacent pairs of the rope dims (rope_interleave=True)")
    if float(c.get("rms_norm_eps", 1e-6)) != 1e-6:
        raise ValueError(
            f"deepseek_v3 with rms_norm_eps {c.get('rms_norm_eps')} does not convert: HF fixes the eps of the q/kv "
            "latent norms at 1e-6 while Megatron uses --norm-epsilon for every norm; only 1e-6 gives the same model"
        )
    heads = c["num_attention_heads"]
    if (c.get("num_key_value_heads") or heads) != heads:
        raise ValueError("deepseek_v3 with num_key_value_heads != num_attention_heads does not convert: "
                         "multi-latent attention has no grouped-query variant")


def _moe_kwargs(c: dict) -> dict:
    layers, dense = c["num_hidden_layers"], c.get("first_k_dense_replace", 0)
    if dense >= layers:
        return {}
    if not c.get("norm_topk_prob", True):
        raise ValueError("deepseek_v3 with norm_topk_prob=False does not convert: Megatron's sigmoid router "
                         "normalizes the top-k probs")
    topk, groups, group_topk = c["num_experts_per_tok"], c.get("n_group") or 1, c.get("topk_group") or 1
    kwargs = dict(
        num_moe_experts=c.get("n_routed_experts") or c["num_local_experts"],
        moe_ffn_hidden_size=c["moe_intermediate_size"],
        moe_router_topk=topk,
        moe_layer_freq=[0] * dense + [1] * (layers - dense),
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_topk_scaling_factor=float(c.get("routed_scaling_factor") or 1.0),
        moe_shared_expert_intermediate_size=c["moe_intermediate_size"] * c.get("n_shared_experts", 1),
        moe_aux_loss_coeff=0.0,
    )
    if groups > 1:
        # HF scores a group by its best two experts; Megatron by its best topk / group_topk.
        if topk // group_topk != 2:
            raise ValueError(
                f"deepseek_v3 with num_experts_per_tok {topk} and topk_group {group_topk} does not convert: "
                "HF ranks groups by their best 2 experts, Megatron by num_experts_per_tok / topk_group; "
                "they agree only when that is 2"
            )
        kwargs.update(moe_router_num_groups=groups, moe_router_group_topk=group_topk)
    return kwargs


def _rope_kwargs(c: dict) -> dict:
    """TransformerConfig fields of HF's default or YaRN RoPE (with rope_theta as ``rotary_base``)."""
    params = c.get("rope_parameters") or c.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", c.get("rope_theta"))
    out = {"rotary_base": 10000.0 if theta is None else float(theta)}
    if rope_type == "default":
        return {**out, "rope_type": "rope"}
    if rope_type != "yarn":
        raise ValueError(f"deepseek_v3 rope_type {rope_type!r} does not convert: default and yarn RoPE do")
    if params.get("factor") is None or params.get("attention_factor") is not None:
        raise ValueError("deepseek_v3 yarn RoPE without 'factor', or with an explicit 'attention_factor', does not "
                         "convert: Megatron derives the cos/sin scale from --mscale and --mscale-all-dim")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if mscale_all_dim and not mscale:
        raise ValueError("deepseek_v3 yarn RoPE with mscale_all_dim but no mscale does not convert: HF then scales "
                         "cos/sin as if both were 1 while scaling the scores by mscale_all_dim")
    if not (mscale and mscale_all_dim):
        mscale, mscale_all_dim = 1.0, 0.0  # HF's cos/sin scale 0.1 ln(factor) + 1 and no score scale
    return {
        **out, "rope_type": "yarn", "rotary_scaling_factor": float(params["factor"]),
        "mscale": float(mscale), "mscale_all_dim": float(mscale_all_dim),
        "yarn_original_max_position_embeddings": int(params["original_max_position_embeddings"]),
        "yarn_beta_fast": float(params.get("beta_fast") or 32.0), "yarn_beta_slow": float(params.get("beta_slow") or 1.0),
        "yarn_correction_range_round_to_int": bool(params.get("truncate", True)),
    }


def deepseek_kwargs(c: dict) -> tuple:
    """HF DeepSeek-V3 config dict -> (TransformerConfig kwargs, GPTModel kwargs)."""
    _refuse_unsupported(c)
    rope = _rope_kwargs(c)
    rotary_base = rope.pop("rotary_base")
    config = dict(
        num_layers=c["num_hidden_layers"],
        hidden_size=c["hidden_size"],
        num_attention_heads=c["num_attention_heads"],
        ffn_hidden_size=c["intermediate_size"],
        kv_channels=c["v_head_dim"],
        layernorm_epsilon=c.get("rms_norm_eps", 1e-6),
        normalization="RMSNorm",
        add_bias_linear=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        hidden_dropout=0.0,
        attention_dropout=c.get("attention_dropout", 0.0),
        qk_layernorm=True,
        multi_latent_attention=True,
        q_lora_rank=c.get("q_lora_rank"),
        kv_lora_rank=c["kv_lora_rank"],
        qk_head_dim=c["qk_nope_head_dim"],
        qk_pos_emb_head_dim=c["qk_rope_head_dim"],
        v_head_dim=c["v_head_dim"],
        **rope,
        **_moe_kwargs(c),
    )
    model = dict(
        vocab_size=c["vocab_size"],
        max_sequence_length=c["max_position_embeddings"],
        position_embedding_type="rope",
        rotary_base=rotary_base,
        share_embeddings_and_output_weights=bool(c.get("tie_word_embeddings", False)),
    )
    return config, model
