"""Model FLOPs per iteration: Megatron-LM's current formula (dense GPT), and BERT's."""

from __future__ import annotations


def num_floating_point_operations(args, batch_size: int) -> float:
    """FLOPs of one training iteration over ``batch_size`` sequences of args.seq_length.

    Counts forward + backward (3x) multiply-adds (2x) of the QKV/output projections, the
    MLP, the attention core (QK^T and PV, halved for the causal mask) and the logits
    over the padded vocabulary, as megatron-facts section 7.3 gives it. MoE layers count
    top-k routed experts of --moe-ffn-hidden-size plus the shared expert instead of the MLP.
    With --multi-latent-attention the attention terms are Megatron's low-rank ones.
    --mtp-num-layers adds Megatron's multi-token prediction terms.
    """
    if getattr(args, "is_hybrid_model", False):  # partial namespaces (tests, tools) have no such flag
        from megatron.training.hybrid_flops import hybrid_num_floating_point_operations

        return hybrid_num_floating_point_operations(args, batch_size)
    s = args.seq_length
    L = args.num_layers
    h = args.hidden_size
    V = args.padded_vocab_size
    f = args.ffn_hidden_size
    n = args.num_attention_heads
    # getattr: the checkpoint converter and tests pass namespaces that carry only the shape flags
    g = args.num_query_groups if getattr(args, "group_query_attention", False) else n
    d = args.kv_channels
    q = d * n
    gated = 1.5 if getattr(args, "swiglu", False) else 1.0
    # Each multi-token prediction depth is one more transformer layer (MoE when the last
    # decoder layer is), its two input norms, final norm and [2h -> h] projection, and one
    # more logit head.
    mtp = getattr(args, "mtp_num_layers", None) or 0
    mlp = 12 * h * gated * (_mlp_width_times_layers(args, L, f) + mtp * _last_layer_width(args, f))
    if getattr(args, "multi_latent_attention", False):
        attention = 6 * (L + mtp) * _mla_terms_per_layer(args)
    else:
        attention = 12 * (L + mtp) * h * q * (1 + g / n) + 6 * (L + mtp) * q * s
    mtp_extra = 6 * mtp * (3 * h + 2 * h * h)
    logits = 6 * h * V * (1 + mtp)
    return float(batch_size) * s * (mlp + attention + mtp_extra + logits)


def _mla_terms_per_layer(args) -> float:
    """Multiply-adds per token of one multi-latent attention layer, as Megatron-LM counts
    them: the low-rank q and kv projections (the +1 is the latent's norm), the shared RoPE
    key part, the output projection, and the attention core over dq + dr (scores) and dv
    (context) dims, halved for the causal mask."""
    h, s, n = args.hidden_size, args.seq_length, args.num_attention_heads
    dq, dr, dv = args.qk_head_dim, args.qk_pos_emb_head_dim, args.v_head_dim
    if args.q_lora_rank is None:
        q_term = h * n * (dq + dr)
    else:
        q_term = args.q_lora_rank * (h + n * (dq + dr) + 1)
    kv_term = args.kv_lora_rank * (h + n * (dq + dv) + 1) + h * dr
    out_proj = n * dv * h
    core = s * n * (dq + dr) / 2 + s * n * dv / 2
    return q_term + kv_term + out_proj + core


def _mlp_width_times_layers(args, num_layers: int, ffn: int) -> float:
    """Sum over layers of the MLP width a token passes through: ffn for dense layers,
    moe_ffn * topk + shared-expert size for MoE layers (per --moe-layer-freq)."""
    if not getattr(args, "num_experts", None):
        return float(num_layers * ffn)
    from megatron.core.transformer.moe.moe_layer_pattern import moe_layer_pattern

    num_moe = sum(moe_layer_pattern(num_layers, args.moe_layer_freq))
    return float((num_layers - num_moe) * ffn + num_moe * _moe_width(args, ffn))


def _moe_width(args, ffn: int) -> float:
    moe_ffn = args.moe_ffn_hidden_size or ffn
    shared = args.moe_shared_expert_intermediate_size or 0
    return moe_ffn * args.moe_router_topk + shared


def _last_layer_width(args, ffn: int) -> float:
    """The MLP width of the decoder's last layer (which multi-token prediction layers copy)."""
    if not getattr(args, "num_experts", None):
        return float(ffn)
    from megatron.core.transformer.moe.moe_layer_pattern import moe_layer_pattern

    return float(_moe_width(args, ffn) if moe_layer_pattern(args.num_layers, args.moe_layer_freq)[-1] else ffn)


def bert_floating_point_operations(args, batch_size: int) -> float:
    """FLOPs of one BERT training iteration over ``batch_size`` sequences of args.seq_length.

    The GPT terms with the attention core counted in full (bidirectional: no causal
    halving), plus the LM head's dense layer over every token and, with the binary head,
    the pooler and binary head once per sequence. Forward + backward (3x), multiply-add (2x).
    """
    s, L, h = args.seq_length, args.num_layers, args.hidden_size
    q = args.kv_channels * args.num_attention_heads
    g = args.num_query_groups if getattr(args, "group_query_attention", False) else args.num_attention_heads
    gated = 1.5 if getattr(args, "swiglu", False) else 1.0
    per_token = (
        12 * h * gated * _mlp_width_times_layers(args, L, args.ffn_hidden_size)
        + 12 * L * h * q * (1 + g / args.num_attention_heads)
        + 12 * L * q * s
        + 6 * h * h
        + 6 * h * args.padded_vocab_size
    )
    per_sequence = 6 * (h * h + 2 * h) if args.bert_binary_head else 0
    return float(batch_size) * (s * per_token + per_sequence)
