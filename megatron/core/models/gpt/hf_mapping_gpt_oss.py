"""Hugging Face gpt-oss (``GptOssForCausalLM``, "gpt_oss") <-> GPTModel (TP=1).

Embeddings, RMSNorms, the attention projections (q/k/v/o, all with biases) and the output
layer have the Llama key layout and go through ``hf_mapping``; this module holds what differs.

Layout facts:
- ``self_attn.sinks`` [heads] is the learnable softmax offset (--softmax-type learnable),
  Megatron's ``self_attention.core_attention.softmax_offset``.
- ``layer_types`` lists "sliding_attention" / "full_attention" per layer: with
  ``sliding_window=W`` that is --window-size W-1,0 with --window-attn-skip-freq as a list
  (1: sliding). gpt-oss alternates, starting with a sliding layer.
- Every layer is MoE. ``mlp.router.weight`` [E, h] and ``mlp.router.bias`` [E] are
  Megatron's router weight and bias (its router has a bias whenever the linears do); HF
  takes the top-k logits, then their softmax, which is Megatron's default router.
- ``mlp.experts.gate_up_proj`` [E, h, 2f] is stored input-major, and its columns interleave
  gate and up (gate = columns 0, 2, 4, ..., up = 1, 3, 5, ...); Megatron's fc1 of expert e
  is [gate; up] rows of [2f, h]. ``gate_up_proj_bias`` [E, 2f] interleaves the same way.
  ``down_proj`` [E, f, h] transposed is fc2 [h, f]; ``down_proj_bias`` [E, h] its bias.
- The experts' activation, clamp(gate, max=L) * sigmoid(alpha clamp(gate, max=L)) *
  (clamp(up, -L, L) + 1) with alpha 1.702, is --quick-geglu with
  --activation-func-clamp-value L (``swiglu_limit``) and --glu-linear-offset 1.
"""

from __future__ import annotations

from typing import Dict

import torch

from megatron.core.transformer.activations import quick_gelu

_QUICK_GELU_ALPHA = 1.702


def attention_extras_to_megatron(sd, attn: str, dst: str) -> Dict[str, torch.Tensor]:
    """One layer's sinks and o_proj bias, HF -> Megatron (the q/k/v go through hf_mapping)."""
    return {
        dst + "self_attention.core_attention.softmax_offset": sd.pop(attn + "sinks"),
        dst + "self_attention.linear_proj.bias": sd.pop(attn + "o_proj.bias"),
    }


def attention_extras_to_hf(sd, src: str, attn: str) -> Dict[str, torch.Tensor]:
    """Inverse of ``attention_extras_to_megatron``."""
    return {
        attn + "sinks": sd.pop(src + "self_attention.core_attention.softmax_offset"),
        attn + "o_proj.bias": sd.pop(src + "self_attention.linear_proj.bias"),
    }


def experts_to_megatron(sd, src: str, dst: str, num_experts: int) -> Dict[str, torch.Tensor]:
    """One layer's router and experts, HF -> Megatron (SequentialMLP names)."""
    out = {dst + "mlp.router.weight": sd.pop(src + "mlp.router.weight"),
           dst + "mlp.router.bias": sd.pop(src + "mlp.router.bias")}
    hf = src + "mlp.experts."
    gate_up, gate_up_bias = sd.pop(hf + "gate_up_proj"), sd.pop(hf + "gate_up_proj_bias")
    down, down_bias = sd.pop(hf + "down_proj"), sd.pop(hf + "down_proj_bias")
    if gate_up.size(0) != num_experts:
        raise ValueError(f"{hf}gate_up_proj holds {gate_up.size(0)} experts, the config says {num_experts}")
    for e in range(num_experts):
        ours = f"{dst}mlp.experts.local_experts.{e}."
        out[ours + "linear_fc1.weight"] = torch.cat((gate_up[e, :, 0::2], gate_up[e, :, 1::2]), dim=1).t().contiguous()
        out[ours + "linear_fc1.bias"] = torch.cat((gate_up_bias[e, 0::2], gate_up_bias[e, 1::2]))
        out[ours + "linear_fc2.weight"] = down[e].t().contiguous()
        out[ours + "linear_fc2.bias"] = down_bias[e].clone()
    return out


def _interleave(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """[..., f] gate and up -> [..., 2f] with gate in the even and up in the odd columns."""
    return torch.stack((gate, up), dim=-1).flatten(-2)


def experts_to_hf(sd, src: str, dst: str, num_experts: int) -> Dict[str, torch.Tensor]:
    """Inverse of ``experts_to_megatron``."""
    experts = [f"{src}mlp.experts.local_experts.{e}." for e in range(num_experts)]
    gate_up, gate_up_bias, down, down_bias = [], [], [], []
    for x in experts:
        gate, up = torch.chunk(sd.pop(x + "linear_fc1.weight").t(), 2, dim=1)
        gate_up.append(_interleave(gate, up))
        gate_b, up_b = torch.chunk(sd.pop(x + "linear_fc1.bias"), 2)
        gate_up_bias.append(_interleave(gate_b, up_b))
        down.append(sd.pop(x + "linear_fc2.weight").t())
        down_bias.append(sd.pop(x + "linear_fc2.bias"))
    hf = dst + "mlp.experts."
    return {
        dst + "mlp.router.weight": sd.pop(src + "mlp.router.weight"),
        dst + "mlp.router.bias": sd.pop(src + "mlp.router.bias"),
        hf + "gate_up_proj": torch.stack(gate_up).contiguous(),
        hf + "gate_up_proj_bias": torch.stack(gate_up_bias).contiguous(),
        hf + "down_proj": torch.stack(down).contiguous(),
        hf + "down_proj_bias": torch.stack(down_bias).contiguous(),
    }


def _window_kwargs(c: dict) -> dict:
    layer_types = c.get("layer_types") or ["full_attention"] * c["num_hidden_layers"]
    unknown = sorted(set(layer_types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise ValueError(f"gpt_oss layer_types {unknown} do not convert: sliding_attention and full_attention do")
    sliding = [int(t == "sliding_attention") for t in layer_types]
    if not any(sliding) or not c.get("sliding_window"):
        return {}
    window = (int(c["sliding_window"]) - 1, 0)
    return {"window_size": window, "window_attn_skip_freq": None if all(sliding) else sliding}


def _rope_theta(c: dict) -> float:
    params = c.get("rope_parameters") or c.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"gpt_oss rope_type {rope_type!r} does not convert yet: only default RoPE "
                         "(YaRN is implemented for multi-latent attention only)")
    theta = params.get("rope_theta", c.get("rope_theta"))
    return 150000.0 if theta is None else float(theta)


def gpt_oss_kwargs(c: dict) -> tuple:
    """HF gpt-oss config dict -> (TransformerConfig kwargs, GPTModel kwargs)."""
    if float(c.get("swiglu_alpha", _QUICK_GELU_ALPHA)) != _QUICK_GELU_ALPHA:
        raise ValueError(f"gpt_oss swiglu_alpha {c['swiglu_alpha']} does not convert: --quick-geglu uses 1.702")
    if c.get("attention_bias", True) is False:
        raise ValueError("gpt_oss with attention_bias=False does not convert: its experts keep their biases, "
                         "and Megatron's --disable-bias-linear drops both")
    heads = c["num_attention_heads"]
    config = dict(
        num_layers=c["num_hidden_layers"],
        hidden_size=c["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=c.get("num_key_value_heads") or heads,
        kv_channels=c.get("head_dim") or c["hidden_size"] // heads,
        ffn_hidden_size=c["intermediate_size"],
        layernorm_epsilon=c.get("rms_norm_eps", 1e-5),
        normalization="RMSNorm",
        add_bias_linear=True,
        gated_linear_unit=True,
        activation_func=quick_gelu,
        glu_linear_offset=1.0,
        activation_func_clamp_value=float(c.get("swiglu_limit", 7.0)),
        softmax_type="learnable",
        hidden_dropout=0.0,
        attention_dropout=c.get("attention_dropout", 0.0),
        num_moe_experts=c["num_local_experts"],
        moe_ffn_hidden_size=c["intermediate_size"],
        moe_router_topk=c["num_experts_per_tok"],
        moe_layer_freq=1,
        moe_router_pre_softmax=False,
        moe_aux_loss_coeff=float(c.get("router_aux_loss_coef") or 0.0),
        **_window_kwargs(c),
    )
    model = dict(
        vocab_size=c["vocab_size"],
        max_sequence_length=c["max_position_embeddings"],
        position_embedding_type="rope",
        rotary_base=_rope_theta(c),
        share_embeddings_and_output_weights=bool(c.get("tie_word_embeddings", False)),
    )
    return config, model
