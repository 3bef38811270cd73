"""Exact conversion between Hugging Face causal-LM state dicts and GPTModel's (TP=1).

Supported: GPT2LMHeadModel ("gpt2"), LlamaForCausalLM ("llama"), MistralForCausalLM
("mistral"), Qwen2ForCausalLM ("qwen2"), and the mixtures of experts MixtralForCausalLM
("mixtral"), Qwen2MoeForCausalLM ("qwen2_moe") and Qwen3MoeForCausalLM ("qwen3_moe"), and
DeepseekV3ForCausalLM ("deepseek_v3": multi-latent attention, see ``hf_mapping_deepseek``), and
GptOssForCausalLM ("gpt_oss": sinks, mixed windows, clamped experts, see ``hf_mapping_gpt_oss``). Pure
tensor shuffling; nothing here imports
transformers. ``hf_to_megatron`` followed by ``megatron_to_hf`` returns equal tensors
under the same keys.

Layout facts the conversion relies on:
- GPT-2 stores Conv1D weights as [in, out]; Megatron linears are [out, in].
- Megatron's fused QKV rows are grouped per query group (see ``fuse_qkv``); HF keeps
  q, k, v separate (GPT-2 as [q; k; v] in one matrix).
- HF Llama-family q/k weights are already ordered for half-rotation RoPE
  (``rotate_half``), which is also Megatron's non-interleaved RoPE: no permutation.
- Megatron's gated fc1 is [gate; up].
- HF ``sliding_window=W`` lets a query see W keys including itself; that is
  Megatron's window (W - 1, 0).
- MoE layers (transformers 5 layout): ``mlp.gate.weight`` [E, h] is the router;
  ``mlp.experts.gate_up_proj`` [E, 2f, h] holds each expert's [gate; up] rows, which is
  Megatron's fc1 of ``mlp.experts.local_experts.{e}``; ``mlp.experts.down_proj`` [E, h, f]
  its fc2. The transformers 4 layout (``block_sparse_moe.experts.{e}.w1/w3/w2``) is read too.
- Mixtral renormalizes the top-k softmax probs (Megatron's default top-k-then-softmax);
  Qwen2-/Qwen3-MoE without ``norm_topk_prob`` keep the full-softmax probs (--moe-router-pre-softmax).
- Qwen2-MoE's ``mlp.shared_expert`` (gate_proj/up_proj/down_proj) is Megatron's
  ``mlp.shared_experts`` MLP, and its ``mlp.shared_expert_gate.weight`` [1, h], applied as
  sigmoid(x @ w^T) to the shared expert's output, is ``mlp.shared_experts.gate_weight``
  (--moe-shared-expert-gate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from megatron.core.models.gpt import hf_mapping_deepseek as deepseek
from megatron.core.models.gpt import hf_mapping_gpt_oss as gpt_oss

ARCHITECTURES = ("gpt2", "llama", "mistral", "qwen2", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss")
_LLAMA_FAMILY = ("llama", "mistral", "qwen2", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss")

# Non-parameter entries HF may keep in a state dict; they carry no model weights.
_HF_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


@dataclass(frozen=True)
class GPTShape:
    """What the conversion needs to know about the model's shape."""

    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    share_embeddings_and_output_weights: bool
    num_moe_experts: int = 0
    moe_layers: Tuple[bool, ...] = ()
    qk_layernorm: bool = False
    multi_latent_attention: bool = False
    q_lora_rank: Optional[int] = None
    gpt_oss: bool = False

    def is_moe(self, layer: int) -> bool:
        """Whether 0-based ``layer`` is an MoE layer."""
        return bool(self.moe_layers) and self.moe_layers[layer]


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: GPTShape) -> torch.Tensor:
    """Separate q [np*hn, ...], k [ng*hn, ...], v [ng*hn, ...] -> Megatron's fused rows.

    Output [(np + 2 ng) * hn, ...] ordered per query group g: its np/ng query heads,
    then key head g, then value head g. Works for weights ([.., h]) and biases.
    """
    ng, hn = shape.num_query_groups, shape.kv_channels
    per_group = shape.num_attention_heads // ng
    rest = q.shape[1:]
    q = q.reshape(ng, per_group * hn, *rest)
    k = k.reshape(ng, hn, *rest)
    v = v.reshape(ng, hn, *rest)
    return torch.cat((q, k, v), dim=1).reshape(-1, *rest).contiguous()


def split_qkv(qkv: torch.Tensor, shape: GPTShape) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``fuse_qkv``: fused rows -> (q [np*hn, ...], k [ng*hn, ...], v [ng*hn, ...])."""
    ng, hn = shape.num_query_groups, shape.kv_channels
    per_group = shape.num_attention_heads // ng
    rest = qkv.shape[1:]
    grouped = qkv.reshape(ng, (per_group + 2) * hn, *rest)
    q, k, v = torch.split(grouped, [per_group * hn, hn, hn], dim=1)
    return tuple(t.reshape(-1, *rest).clone() for t in (q, k, v))


def _check_arch(arch: str) -> None:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unsupported Hugging Face architecture {arch!r}: use one of {', '.join(ARCHITECTURES)}")


class _Reader:
    """Pops keys from a copy of a state dict, so leftovers can be reported."""

    def __init__(self, state_dict: Dict[str, torch.Tensor]):
        self.remaining = dict(state_dict)

    def pop(self, key: str) -> torch.Tensor:
        if key not in self.remaining:
            raise KeyError(f"state dict has no {key!r}: is the model shape / architecture right?")
        return self.remaining.pop(key)

    def pop_optional(self, key: str):
        return self.remaining.pop(key, None)

    def finish(self, ignored_suffixes=()) -> None:
        left = [k for k in self.remaining if not k.endswith(tuple(ignored_suffixes))]
        if left:
            raise ValueError(f"unconverted keys (the shape or architecture does not match): {sorted(left)[:8]}")


def _gpt2_to_megatron(sd: _Reader, shape: GPTShape) -> Dict[str, torch.Tensor]:
    out = {
        "embedding.word_embeddings.weight": sd.pop("transformer.wte.weight"),
        "embedding.position_embeddings.weight": sd.pop("transformer.wpe.weight"),
    }
    h = shape.num_attention_heads * shape.kv_channels
    for i in range(shape.num_layers):
        src, dst = f"transformer.h.{i}.", f"decoder.layers.{i}."
        for hf_norm, norm in (("ln_1", "input_layernorm"), ("ln_2", "pre_mlp_layernorm")):
            out[dst + f"{norm}.weight"] = sd.pop(src + f"{hf_norm}.weight")
            out[dst + f"{norm}.bias"] = sd.pop(src + f"{hf_norm}.bias")
        qkv_w = sd.pop(src + "attn.c_attn.weight").t()
        qkv_b = sd.pop(src + "attn.c_attn.bias")
        out[dst + "self_attention.linear_qkv.weight"] = fuse_qkv(*torch.split(qkv_w, h, dim=0), shape)
        out[dst + "self_attention.linear_qkv.bias"] = fuse_qkv(*torch.split(qkv_b, h, dim=0), shape)
        for hf_lin, lin in (("attn.c_proj", "self_attention.linear_proj"), ("mlp.c_fc", "mlp.linear_fc1"), ("mlp.c_proj", "mlp.linear_fc2")):
            out[dst + f"{lin}.weight"] = sd.pop(src + f"{hf_lin}.weight").t().contiguous()
            out[dst + f"{lin}.bias"] = sd.pop(src + f"{hf_lin}.bias")
    out["decoder.final_layernorm.weight"] = sd.pop("transformer.ln_f.weight")
    out["decoder.final_layernorm.bias"] = sd.pop("transformer.ln_f.bias")
    lm_head = sd.pop_optional("lm_head.weight")
    if not shape.share_embeddings_and_output_weights:
        if lm_head is None:
            raise KeyError("untied model but the state dict has no 'lm_head.weight'")
        out["output_layer.weight"] = lm_head
    return out


def _megatron_to_gpt2(sd: _Reader, shape: GPTShape) -> Dict[str, torch.Tensor]:
    out = {
        "transformer.wte.weight": sd.pop("embedding.word_embeddings.weight"),
        "transformer.wpe.weight": sd.pop("embedding.position_embeddings.weight"),
    }
    for i in range(shape.num_layers):
        src, dst = f"decoder.layers.{i}.", f"transformer.h.{i}."
        for hf_norm, norm in (("ln_1", "input_layernorm"), ("ln_2", "pre_mlp_layernorm")):
            out[dst + f"{hf_norm}.weight"] = sd.pop(src + f"{norm}.weight")
            out[dst + f"{hf_norm}.bias"] = sd.pop(src + f"{norm}.bias")
        q, k, v = split_qkv(sd.pop(src + "self_attention.linear_qkv.weight"), shape)
        out[dst + "attn.c_attn.weight"] = torch.cat((q, k, v), dim=0).t().contiguous()
        out[dst + "attn.c_attn.bias"] = torch.cat(split_qkv(sd.pop(src + "self_attention.linear_qkv.bias"), shape))
        for hf_lin, lin in (("attn.c_proj", "self_attention.linear_proj"), ("mlp.c_fc", "mlp.linear_fc1"), ("mlp.c_proj", "mlp.linear_fc2")):
            out[dst + f"{hf_lin}.weight"] = sd.pop(src + f"{lin}.weight").t().contiguous()
            out[dst + f"{hf_lin}.bias"] = sd.pop(src + f"{lin}.bias")
    out["transformer.ln_f.weight"] = sd.pop("decoder.final_layernorm.weight")
    out["transformer.ln_f.bias"] = sd.pop("decoder.final_layernorm.bias")
    out["lm_head.weight"] = _output_weight(sd, out["transformer.wte.weight"], shape)
    return out


def _output_weight(sd: _Reader, word_embeddings: torch.Tensor, shape: GPTShape) -> torch.Tensor:
    if shape.share_embeddings_and_output_weights:
        # HF state dicts list the tied lm_head too; give it its own copy of the values.
        return word_embeddings.clone()
    return sd.pop("output_layer.weight")


def _llama_to_megatron(sd: _Reader, shape: GPTShape) -> Dict[str, torch.Tensor]:
    out = {"embedding.word_embeddings.weight": sd.pop("model.embed_tokens.weight")}
    for i in range(shape.num_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        out[dst + "input_layernorm.weight"] = sd.pop(src + "input_layernorm.weight")
        out[dst + "pre_mlp_layernorm.weight"] = sd.pop(src + "post_attention_layernorm.weight")
        attn = src + "self_attn."
        if shape.multi_latent_attention:
            out.update(deepseek.mla_hf_to_megatron(sd, attn, dst + "self_attention.", shape.q_lora_rank))
        else:
            out.update(_qkv_hf_to_megatron(sd, attn, dst, shape))
        if shape.gpt_oss:
            out.update(gpt_oss.attention_extras_to_megatron(sd, attn, dst))
            out.update(gpt_oss.experts_to_megatron(sd, src, dst, shape.num_moe_experts))
            continue
        if shape.is_moe(i):
            out.update(_hf_experts_to_megatron(sd, src, dst, shape.num_moe_experts))
            out.update(_hf_shared_expert_to_megatron(sd, src, dst))
            if shape.multi_latent_attention:
                out.update(deepseek.deepseek_moe_extras_to_megatron(sd, src, dst))
            continue
        out[dst + "mlp.linear_fc1.weight"] = torch.cat(
            (sd.pop(src + "mlp.gate_proj.weight"), sd.pop(src + "mlp.up_proj.weight")), dim=0
        )
        out[dst + "mlp.linear_fc2.weight"] = sd.pop(src + "mlp.down_proj.weight")
    out["decoder.final_layernorm.weight"] = sd.pop("model.norm.weight")
    lm_head = sd.pop_optional("lm_head.weight")
    if not shape.share_embeddings_and_output_weights:
        if lm_head is None:
            raise KeyError("untied model but the state dict has no 'lm_head.weight'")
        out["output_layer.weight"] = lm_head
    return out


def _qkv_hf_to_megatron(sd: _Reader, attn: str, dst: str, shape: GPTShape) -> Dict[str, torch.Tensor]:
    """One layer's separate q/k/v (and q/k norms) -> the fused linear_qkv."""
    out = {
        dst + "self_attention.linear_qkv.weight": fuse_qkv(
            sd.pop(attn + "q_proj.weight"), sd.pop(attn + "k_proj.weight"), sd.pop(attn + "v_proj.weight"), shape
        )
    }
    biases = [sd.pop_optional(attn + f"{n}_proj.bias") for n in "qkv"]
    if any(b is not None for b in biases):
        out[dst + "self_attention.linear_qkv.bias"] = fuse_qkv(*biases, shape)
    out[dst + "self_attention.linear_proj.weight"] = sd.pop(attn + "o_proj.weight")
    if shape.qk_layernorm:
        out[dst + "self_attention.q_layernorm.weight"] = sd.pop(attn + "q_norm.weight")
        out[dst + "self_attention.k_layernorm.weight"] = sd.pop(attn + "k_norm.weight")
    return out


def _megatron_to_llama(sd: _Reader, shape: GPTShape, arch: str, expert_layout: str) -> Dict[str, torch.Tensor]:
    out = {"model.embed_tokens.weight": sd.pop("embedding.word_embeddings.weight")}
    for i in range(shape.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = sd.pop(src + "input_layernorm.weight")
        out[dst + "post_attention_layernorm.weight"] = sd.pop(src + "pre_mlp_layernorm.weight")
        attn = dst + "self_attn."
        if shape.multi_latent_attention:
            out.update(deepseek.mla_megatron_to_hf(sd, src + "self_attention.", attn, shape.q_lora_rank))
        else:
            out.update(_qkv_megatron_to_hf(sd, src, attn, shape))
        if shape.gpt_oss:
            out.update(gpt_oss.attention_extras_to_hf(sd, src, attn))
            out.update(gpt_oss.experts_to_hf(sd, src, dst, shape.num_moe_experts))
            continue
        if shape.is_moe(i):
            out.update(_megatron_experts_to_hf(sd, src, dst, shape.num_moe_experts, arch, expert_layout))
            out.update(_megatron_shared_expert_to_hf(sd, src, dst))
            if shape.multi_latent_attention:
                out.update(deepseek.deepseek_moe_extras_to_hf(sd, src, dst))
            continue
        gate, up = torch.chunk(sd.pop(src + "mlp.linear_fc1.weight"), 2, dim=0)
        out[dst + "mlp.gate_proj.weight"] = gate.clone()
        out[dst + "mlp.up_proj.weight"] = up.clone()
        out[dst + "mlp.down_proj.weight"] = sd.pop(src + "mlp.linear_fc2.weight")
    out["model.norm.weight"] = sd.pop("decoder.final_layernorm.weight")
    out["lm_head.weight"] = _output_weight(sd, out["model.embed_tokens.weight"], shape)
    return out


def _qkv_megatron_to_hf(sd: _Reader, src: str, attn: str, shape: GPTShape) -> Dict[str, torch.Tensor]:
    """Inverse of ``_qkv_hf_to_megatron``."""
    q, k, v = split_qkv(sd.pop(src + "self_attention.linear_qkv.weight"), shape)
    out = {attn + "q_proj.weight": q, attn + "k_proj.weight": k, attn + "v_proj.weight": v}
    bias = sd.pop_optional(src + "self_attention.linear_qkv.bias")
    if bias is not None:
        q, k, v = split_qkv(bias, shape)
        out.update({attn + "q_proj.bias": q, attn + "k_proj.bias": k, attn + "v_proj.bias": v})
    out[attn + "o_proj.weight"] = sd.pop(src + "self_attention.linear_proj.weight")
    if shape.qk_layernorm:
        out[attn + "q_norm.weight"] = sd.pop(src + "self_attention.q_layernorm.weight")
        out[attn + "k_norm.weight"] = sd.pop(src + "self_attention.k_layernorm.weight")
    return out


# HF per-expert file layouts: (router key, expert prefix, (gate, up, down) names) after the layer prefix.
_MIXTRAL_EXPERT_FILES = ("block_sparse_moe.gate.weight", "block_sparse_moe.experts.{}.", ("w1", "w3", "w2"))
_EXPERT_FILES = ("mlp.gate.weight", "mlp.experts.{}.", ("gate_proj", "up_proj", "down_proj"))


def _hf_shared_expert_to_megatron(sd: _Reader, src: str, dst: str) -> Dict[str, torch.Tensor]:
    """Qwen2-MoE's gated shared expert, HF -> Megatron (none in the layer: empty)."""
    gate = sd.pop_optional(src + "mlp.shared_expert_gate.weight")
    if gate is None:
        return {}
    hf, ours = src + "mlp.shared_expert.", dst + "mlp.shared_experts."
    return {
        ours + "linear_fc1.weight": torch.cat((sd.pop(hf + "gate_proj.weight"), sd.pop(hf + "up_proj.weight")), dim=0),
        ours + "linear_fc2.weight": sd.pop(hf + "down_proj.weight"),
        ours + "gate_weight": gate,
    }


def _megatron_shared_expert_to_hf(sd: _Reader, src: str, dst: str) -> Dict[str, torch.Tensor]:
    """Inverse of ``_hf_shared_expert_to_megatron``. A shared expert without the gate has
    no HF counterpart here: its keys stay unconverted and are reported."""
    gate = sd.pop_optional(src + "mlp.shared_experts.gate_weight")
    if gate is None:
        return {}
    ours, hf = src + "mlp.shared_experts.", dst + "mlp.shared_expert."
    gate_proj, up_proj = torch.chunk(sd.pop(ours + "linear_fc1.weight"), 2, dim=0)
    return {
        hf + "gate_proj.weight": gate_proj.clone(),
        hf + "up_proj.weight": up_proj.clone(),
        hf + "down_proj.weight": sd.pop(ours + "linear_fc2.weight"),
        dst + "mlp.shared_expert_gate.weight": gate,
    }


def _hf_experts_to_megatron(sd: _Reader, src: str, dst: str, num_experts: int) -> Dict[str, torch.Tensor]:
    """One MoE layer's router and experts, HF -> Megatron (SequentialMLP names). Reads the
    three layouts HF weights come in: Mixtral's files (block_sparse_moe.experts.E.w1/w3/w2),
    per-expert files (mlp.experts.E.gate_proj/up_proj/down_proj, as transformers 5 saves
    Qwen3-MoE), and transformers 5's in-memory fused tensors (mlp.experts.gate_up_proj)."""
    fused = src + "mlp.experts.gate_up_proj"
    if fused in sd.remaining:
        out = {dst + "mlp.router.weight": sd.pop(src + "mlp.gate.weight")}
        gate_up, down = sd.pop(fused), sd.pop(src + "mlp.experts.down_proj")
        if gate_up.size(0) != num_experts or down.size(0) != num_experts:
            raise ValueError(f"{src}mlp.experts holds {gate_up.size(0)} experts, the config says {num_experts}")
        for e in range(num_experts):
            out[f"{dst}mlp.experts.local_experts.{e}.linear_fc1.weight"] = gate_up[e].clone()
            out[f"{dst}mlp.experts.local_experts.{e}.linear_fc2.weight"] = down[e].clone()
        return out
    mixtral = src + _MIXTRAL_EXPERT_FILES[0] in sd.remaining
    router, expert, (gate, up, down) = _MIXTRAL_EXPERT_FILES if mixtral else _EXPERT_FILES
    out = {dst + "mlp.router.weight": sd.pop(src + router)}
    for e in range(num_experts):
        prefix = src + expert.format(e)
        fc1 = torch.cat((sd.pop(f"{prefix}{gate}.weight"), sd.pop(f"{prefix}{up}.weight")), dim=0)
        out[f"{dst}mlp.experts.local_experts.{e}.linear_fc1.weight"] = fc1
        out[f"{dst}mlp.experts.local_experts.{e}.linear_fc2.weight"] = sd.pop(f"{prefix}{down}.weight")
    return out


def _megatron_experts_to_hf(sd: _Reader, src: str, dst: str, num_experts: int, arch: str,
                            expert_layout: str) -> Dict[str, torch.Tensor]:
    """One MoE layer's router and experts, Megatron -> HF: transformers 5's in-memory fused
    tensors (``expert_layout="fused"``) or the per-expert files its save_pretrained writes
    and every HF reader loads (``"files"``: Mixtral's block_sparse_moe w1/w3/w2, else
    mlp.experts.E.gate_proj/up_proj/down_proj)."""
    experts = [f"{src}mlp.experts.local_experts.{e}." for e in range(num_experts)]
    router = sd.pop(src + "mlp.router.weight")
    if expert_layout == "fused":
        return {
            dst + "mlp.gate.weight": router,
            dst + "mlp.experts.gate_up_proj": torch.stack([sd.pop(x + "linear_fc1.weight") for x in experts]),
            dst + "mlp.experts.down_proj": torch.stack([sd.pop(x + "linear_fc2.weight") for x in experts]),
        }
    if expert_layout != "files":
        raise ValueError(f"expert_layout must be 'fused' or 'files', got {expert_layout!r}")
    router_key, expert, names = _MIXTRAL_EXPERT_FILES if arch == "mixtral" else _EXPERT_FILES
    out = {dst + router_key: router}
    for e, x in enumerate(experts):
        prefix = dst + expert.format(e)
        gate, up = torch.chunk(sd.pop(x + "linear_fc1.weight"), 2, dim=0)
        out[prefix + names[0] + ".weight"] = gate.clone()
        out[prefix + names[1] + ".weight"] = up.clone()
        out[prefix + names[2] + ".weight"] = sd.pop(x + "linear_fc2.weight")
    return out


def hf_to_megatron(hf_state_dict: Dict[str, torch.Tensor], arch: str, shape: GPTShape) -> Dict[str, torch.Tensor]:
    """HF state dict (full tensors) -> GPTModel state dict at TP=1.

    Raises KeyError for a missing HF key and ValueError for HF keys left unconverted.
    """
    _check_arch(arch)
    reader = _Reader(hf_state_dict)
    out = _gpt2_to_megatron(reader, shape) if arch == "gpt2" else _llama_to_megatron(reader, shape)
    reader.finish(_HF_IGNORED_SUFFIXES)
    return out


def megatron_to_hf(state_dict: Dict[str, torch.Tensor], arch: str, shape: GPTShape,
                   expert_layout: str = "fused") -> Dict[str, torch.Tensor]:
    """GPTModel state dict at TP=1 -> HF state dict (with ``lm_head.weight`` also when tied).
    ``expert_layout``: MoE experts as transformers' in-memory fused tensors ("fused", what
    ``model.state_dict()`` holds) or as the per-expert tensors of HF checkpoint files ("files")."""
    _check_arch(arch)
    reader = _Reader({k: v for k, v in state_dict.items() if not k.endswith("._extra_state")})
    out = (_megatron_to_gpt2(reader, shape) if arch == "gpt2"
           else _megatron_to_llama(reader, shape, arch, expert_layout))
    reader.finish()
    return out


# Llama-3.1 scaling as Megatron implements it (--use-rope-scaling): only the factor is a flag.
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _rope_params(hf_config: dict) -> dict:
    return hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}


def _rope_theta(hf_config: dict) -> float:
    params = _rope_params(hf_config)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"HF rope_type {rope_type!r} is not supported yet: default and llama3 RoPE convert")
    theta = params.get("rope_theta", hf_config.get("rope_theta"))
    return 10000.0 if theta is None else float(theta)


def _rope_scaling_kwargs(hf_config: dict) -> dict:
    """GPTModel kwargs for HF's llama3 rope type (empty for default RoPE)."""
    params = _rope_params(hf_config)
    if params.get("rope_type", params.get("type", "default")) != "llama3":
        return {}
    for key, value in _LLAMA3_FIXED.items():
        if float(params.get(key, value)) != float(value):
            raise ValueError(
                f"HF llama3 rope scaling with {key}={params[key]} does not convert: --use-rope-scaling "
                f"fixes it to {value}"
            )
    return {"rope_scaling": True, "rope_scaling_factor": float(params.get("factor", 8.0))}


def _gpt2_kwargs(c: dict) -> Tuple[dict, dict]:
    if c.get("scale_attn_by_inverse_layer_idx") or c.get("reorder_and_upcast_attn"):
        raise ValueError("GPT-2 configs with scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn do not convert")
    act = c.get("activation_function", "gelu_new")
    if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"GPT-2 activation_function {act!r} does not convert: use gelu or gelu_new")
    config = dict(
        num_layers=c["n_layer"],
        hidden_size=c["n_embd"],
        num_attention_heads=c["n_head"],
        ffn_hidden_size=c.get("n_inner") or 4 * c["n_embd"],
        layernorm_epsilon=c.get("layer_norm_epsilon", 1e-5),
        normalization="LayerNorm",
        add_bias_linear=True,
        activation_func=F.gelu,
        openai_gelu=act != "gelu",
        # exact GeLU: the fused bias-GeLU computes the tanh approximation (as Megatron's)
        bias_activation_fusion=act != "gelu",
        hidden_dropout=c.get("resid_pdrop", 0.1),
        attention_dropout=c.get("attn_pdrop", 0.1),
    )
    model = dict(
        vocab_size=c["vocab_size"],
        max_sequence_length=c["n_positions"],
        position_embedding_type="learned_absolute",
        share_embeddings_and_output_weights=c.get("tie_word_embeddings", True),
    )
    return config, model


def _llama_kwargs(c: dict, arch: str) -> Tuple[dict, dict]:
    if c.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{arch} hidden_act {c.get('hidden_act')!r} does not convert: only silu (SwiGLU)")
    if c.get("attention_bias") or c.get("mlp_bias"):
        raise ValueError(f"{arch} with attention_bias / mlp_bias does not convert: Megatron has no o_proj-only bias")
    heads = c["num_attention_heads"]
    window = None
    if arch in ("mistral", "mixtral") and c.get("sliding_window"):
        window = (int(c["sliding_window"]) - 1, 0)
    if arch in ("qwen2", "qwen2_moe", "qwen3_moe") and c.get("use_sliding_window"):
        raise ValueError(f"{arch} with use_sliding_window=True (per-layer windows) does not convert")
    config = dict(
        num_layers=c["num_hidden_layers"],
        hidden_size=c["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=c.get("num_key_value_heads") or heads,
        ffn_hidden_size=c["intermediate_size"],
        kv_channels=c.get("head_dim") or c["hidden_size"] // heads,
        layernorm_epsilon=c.get("rms_norm_eps", 1e-6),
        normalization="RMSNorm",
        add_bias_linear=False,
        add_qkv_bias=arch == "qwen2" or (arch == "qwen2_moe" and c.get("qkv_bias", True)),
        gated_linear_unit=True,
        activation_func=F.silu,
        hidden_dropout=0.0,
        attention_dropout=c.get("attention_dropout", 0.0),
        window_size=window,
        qk_layernorm=arch == "qwen3_moe",
        **_moe_kwargs(c, arch),
    )
    model = dict(
        vocab_size=c["vocab_size"],
        max_sequence_length=c["max_position_embeddings"],
        position_embedding_type="rope",
        rotary_base=_rope_theta(c),
        share_embeddings_and_output_weights=bool(c.get("tie_word_embeddings", False)),
        **_rope_scaling_kwargs(c),
    )
    return config, model


def _qwen_moe_layers(c: dict) -> list:
    step, dense = c.get("decoder_sparse_step", 1), set(c.get("mlp_only_layers") or [])
    return [int(i not in dense and (i + 1) % step == 0) for i in range(c["num_hidden_layers"])]


def _moe_kwargs(c: dict, arch: str) -> dict:
    """TransformerConfig MoE fields of a Mixtral / Qwen2-MoE / Qwen3-MoE config (empty otherwise)."""
    shared = {}
    if arch == "mixtral":
        experts, ffn, pattern, pre_softmax = c["num_local_experts"], c["intermediate_size"], 1, False
    elif arch in ("qwen2_moe", "qwen3_moe"):
        experts, ffn = c.get("num_experts") or c["num_local_experts"], c["moe_intermediate_size"]
        pattern, pre_softmax = _qwen_moe_layers(c), not c.get("norm_topk_prob", False)
        if arch == "qwen2_moe":
            if not c.get("shared_expert_intermediate_size"):
                raise ValueError("qwen2_moe with shared_expert_intermediate_size 0 does not convert: "
                                 "HF still builds a gated shared expert of width 0")
            shared = dict(moe_shared_expert_intermediate_size=c["shared_expert_intermediate_size"],
                          moe_shared_expert_gate=True)
    else:
        return {}
    return dict(
        **shared,
        num_moe_experts=experts,
        moe_ffn_hidden_size=ffn,
        moe_router_topk=c["num_experts_per_tok"],
        moe_layer_freq=pattern,
        moe_router_pre_softmax=pre_softmax,
        moe_aux_loss_coeff=float(c.get("router_aux_loss_coef") or 0.0),
    )


def gpt_kwargs_from_hf_config(hf_config: dict) -> Tuple[str, dict, dict]:
    """HF config dict (``config.to_dict()``) -> (arch, TransformerConfig kwargs, GPTModel kwargs)."""
    arch = hf_config.get("model_type")
    _check_arch(arch)
    if arch == "gpt2":
        config, model = _gpt2_kwargs(hf_config)
    elif arch == "deepseek_v3":
        config, model = deepseek.deepseek_kwargs(hf_config)
    elif arch == "gpt_oss":
        config, model = gpt_oss.gpt_oss_kwargs(hf_config)
    else:
        config, model = _llama_kwargs(hf_config, arch)
    return arch, config, model


def shape_from_kwargs(config_kwargs: dict, model_kwargs: dict) -> GPTShape:
    """The ``GPTShape`` of the model described by ``gpt_kwargs_from_hf_config``'s output."""
    heads = config_kwargs["num_attention_heads"]
    return GPTShape(
        num_layers=config_kwargs["num_layers"],
        num_attention_heads=heads,
        num_query_groups=config_kwargs.get("num_query_groups") or heads,
        kv_channels=config_kwargs.get("kv_channels") or config_kwargs["hidden_size"] // heads,
        share_embeddings_and_output_weights=model_kwargs["share_embeddings_and_output_weights"],
        num_moe_experts=config_kwargs.get("num_moe_experts") or 0,
        moe_layers=_moe_layer_tuple(config_kwargs),
        qk_layernorm=bool(config_kwargs.get("qk_layernorm", False)),
        multi_latent_attention=bool(config_kwargs.get("multi_latent_attention", False)),
        q_lora_rank=config_kwargs.get("q_lora_rank"),
        gpt_oss=config_kwargs.get("softmax_type") == "learnable" and bool(config_kwargs.get("num_moe_experts")),
    )


def _moe_layer_tuple(config_kwargs: dict) -> Tuple[bool, ...]:
    if not config_kwargs.get("num_moe_experts"):
        return ()
    from megatron.core.transformer.moe.moe_layer_pattern import moe_layer_pattern

    return tuple(moe_layer_pattern(config_kwargs["num_layers"], config_kwargs.get("moe_layer_freq", 1)))
