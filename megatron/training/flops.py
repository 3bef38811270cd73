"""Model FLOPs per iteration, by Megatron-LM's current formula (dense GPT)."""

from __future__ import annotations


def num_floating_point_operations(args, batch_size: int) -> float:
    """FLOPs of one training iteration over ``batch_size`` sequences of args.seq_length.

    Counts forward + backward (3x) multiply-adds (2x) of the QKV/output projections, the
    MLP, the attention core (QK^T and PV, halved for the causal mask) and the logits
    over the padded vocabulary, as megatron-facts section 7.3 gives it.
    """
    s = args.seq_length
    L = args.num_layers
    h = args.hidden_size
    V = args.padded_vocab_size
    f = args.ffn_hidden_size
    n = args.num_attention_heads
    g = args.num_query_groups if getattr(args, "group_query_attention", False) else n
    d = args.kv_channels
    q = d * n
    gated = 1.5 if getattr(args, "swiglu", False) else 1.0
    mlp = 12 * L * h * f * gated
    attn_proj = 12 * L * h * q * (1 + g / n)
    attn_core = 6 * L * q * s
    logits = 6 * h * V
    return float(batch_size) * s * (mlp + attn_proj + attn_core + logits)
