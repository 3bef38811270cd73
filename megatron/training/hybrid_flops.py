"""Model FLOPs per iteration of a hybrid (Mamba-2 / attention / MLP / MoE) model.

Megatron counts each layer kind by its own formula and applies 3x (forward + two backward
GEMMs) to the sum; multiply-adds count 2. Per token, forward:

  mamba      2*h*(2*d_in + 2*G*N + H)   in-projection to z, x, B, C, dt
             + 7*d_in*N                  the scan
             + 2*d_in*h                  out-projection
  attention  4*h*q*(1 + g/n)            QKV + output projections (q = kv_channels * heads)
             + 2*s*q                     QK^T and PV, halved for the causal mask (as our GPT count)
  mlp        4*h*f*gated                 fc1 + fc2 (gated = 3/2 with --swiglu)
  moe        4*h*(moe_ffn*topk + shared)*gated
  logits     2*h*V

with d_in the mixer width (H heads of --mamba-head-dim), G groups, N state dim, f the MLP
width and V the padded vocabulary.
"""

from __future__ import annotations

from megatron.core.models.mamba.layer_pattern import ATTENTION, MAMBA, MLP, MOE, count_layers


def hybrid_layer_pattern_of(args) -> str:
    """The pattern of the command line (--hybrid-layer-pattern or the older ratio flags)."""
    from megatron.core.models.mamba.layer_pattern import resolve_layer_pattern

    return resolve_layer_pattern(args.num_layers, args.hybrid_layer_pattern, args.hybrid_attention_ratio,
                                 args.hybrid_mlp_ratio, args.hybrid_override_pattern)


def _mamba_per_token(args) -> float:
    h = args.hidden_size
    heads = args.mamba_num_heads or (2 * h) // args.mamba_head_dim
    d_in = heads * args.mamba_head_dim
    bc = 2 * args.mamba_num_groups * args.mamba_state_dim
    return 2 * h * (2 * d_in + bc + heads) + 7 * d_in * args.mamba_state_dim + 2 * d_in * h


def _attention_per_token(args) -> float:
    n = args.num_attention_heads
    g = args.num_query_groups if args.group_query_attention else n
    q = args.kv_channels * n
    return 4 * args.hidden_size * q * (1 + g / n) + 2 * args.seq_length * q


def hybrid_num_floating_point_operations(args, batch_size: int) -> float:
    """FLOPs of one training iteration over ``batch_size`` sequences of args.seq_length."""
    counts = count_layers(hybrid_layer_pattern_of(args))
    h = args.hidden_size
    gated = 1.5 if args.swiglu else 1.0
    moe_width = 0.0
    if counts[MOE]:
        moe_width = (args.moe_ffn_hidden_size or args.ffn_hidden_size) * args.moe_router_topk \
            + (args.moe_shared_expert_intermediate_size or 0)
    per_token = (
        counts[MAMBA] * _mamba_per_token(args)
        + counts[ATTENTION] * _attention_per_token(args)
        + counts[MLP] * 4 * h * args.ffn_hidden_size * gated
        + counts[MOE] * 4 * h * moe_width * gated
        + 2 * h * args.padded_vocab_size
    )
    return 3.0 * float(batch_size) * args.seq_length * per_token
