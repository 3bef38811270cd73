"""Network-size, transformer-implementation and MoE flags (Megatron's names and defaults).

Flags whose help is ``None`` take it from the matching ``TransformerConfig`` field docstring
(see ``config_help``).
"""

from __future__ import annotations

import argparse

from megatron.training.arguments_groups.flag_helpers import int_or_pattern, int_tuple

POSITION_EMBEDDING_TYPES = ["learned_absolute", "rope", "yarn", "mrope", "relative", "none"]
# "sdpa" is this framework's extra: torch.nn.functional.scaled_dot_product_attention.
ATTENTION_BACKENDS = ["flash", "fused", "unfused", "local", "auto", "sdpa"]


def add_network_size_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Model shape, position embeddings, norms, activations, biases and attention options."""
    g = parser.add_argument_group(title="network size")
    g.add_argument("--num-layers", type=int, default=None, help=None)
    g.add_argument("--encoder-num-layers", type=int, default=None, help="Number of encoder layers (T5).")
    g.add_argument("--decoder-num-layers", type=int, default=None, help="Number of decoder layers (T5).")
    g.add_argument("--hidden-size", type=int, default=None, help=None)
    g.add_argument("--ffn-hidden-size", type=int, default=None,
                   help="MLP hidden size; default 4 * hidden size, or int(8h/3 / 64) * 64 with --swiglu.")
    g.add_argument("--num-attention-heads", type=int, default=None, help=None)
    g.add_argument("--kv-channels", type=int, default=None, help=None)
    g.add_argument("--group-query-attention", action="store_true",
                   help="Use grouped-query attention; the number of groups is --num-query-groups.")
    g.add_argument("--num-query-groups", type=int, default=1,
                   help="Key/value head groups with --group-query-attention (ignored without it).")
    g.add_argument("--max-position-embeddings", type=int, default=None,
                   help="Maximum sequence length the position embedding supports (required).")
    g.add_argument("--position-embedding-type", type=str, default="learned_absolute",
                   choices=POSITION_EMBEDDING_TYPES, help="Position embedding type.")
    g.add_argument("--use-rotary-position-embeddings", action="store_true",
                   help="Deprecated spelling of --position-embedding-type rope.")
    g.add_argument("--rotary-base", type=int, default=10000, help="Base of the rotary frequencies.")
    g.add_argument("--rotary-percent", type=float, default=1.0,
                   help="Fraction of each head's dimensions that rotary embeddings rotate.")
    g.add_argument("--rotary-interleaved", action="store_true", help=None)
    g.add_argument("--rotary-seq-len-interpolation-factor", type=int, default=None,
                   help="Linear position interpolation factor for rotary embeddings.")
    g.add_argument("--use-rope-scaling", action="store_true", help="Apply Llama-3.1 rope frequency scaling.")
    g.add_argument("--rope-scaling-factor", type=float, default=8.0, help="Rope scaling factor of --use-rope-scaling.")
    g.add_argument("--no-position-embedding", action="store_false", dest="add_position_embedding",
                   help="Deprecated: use --position-embedding-type none or rope.")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="Pad the vocabulary to a multiple of this value times the tensor-parallel size.")
    g.add_argument("--padded-vocab-size", type=int, default=None,
                   help="Use exactly this padded vocabulary size instead of computing it.")
    g.add_argument("--normalization", type=str, default="LayerNorm", choices=["LayerNorm", "RMSNorm"], help=None)
    g.add_argument("--norm-epsilon", type=float, default=1e-5, help=None)
    g.add_argument("--apply-layernorm-1p", action="store_true", help=None)
    g.add_argument("--apply-residual-connection-post-layernorm", action="store_true", help=None)
    g.add_argument("--openai-gelu", action="store_true", help=None)
    g.add_argument("--squared-relu", action="store_true", help="Use squared ReLU as the MLP activation.")
    g.add_argument("--swiglu", action="store_true",
                   help="Use a gated MLP with SiLU (SwiGLU); fc1 becomes [gate; up].")
    g.add_argument("--quick-geglu", action="store_true", help="Use a gated MLP with quick-GeLU.")
    g.add_argument("--glu-linear-offset", type=float, default=0.0, help=None)
    g.add_argument("--activation-func-clamp-value", type=float, default=None, help=None)
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true",
                   help="Give the output layer its own weights instead of sharing the word embedding.")
    g.add_argument("--qk-layernorm", action="store_true", help=None)
    g.add_argument("--qk-l2-norm", action="store_true", help=None)
    g.add_argument("--softmax-type", type=str, default="vanilla", choices=["vanilla", "off-by-one", "learnable"],
                   help=None)
    g.add_argument("--multi-latent-attention", action="store_true", help=None)
    g.add_argument("--q-lora-rank", type=int, default=None, help=None)
    g.add_argument("--kv-lora-rank", type=int, default=32, help=None)
    g.add_argument("--qk-head-dim", type=int, default=128, help=None)
    g.add_argument("--qk-pos-emb-head-dim", type=int, default=64, help=None)
    g.add_argument("--v-head-dim", type=int, default=128, help=None)
    g.add_argument("--rotary-scaling-factor", type=float, default=1.0, help=None)
    g.add_argument("--mscale", type=float, default=1.0, help=None)
    g.add_argument("--mscale-all-dim", type=float, default=0.0, help=None)
    g.add_argument("--rope-type", type=str, default=None, choices=["rope", "yarn"], help=None)
    g.add_argument("--yarn-original-max-position-embeddings", type=int, default=None, help=None)
    g.add_argument("--yarn-beta-fast", type=float, default=None, help=None)
    g.add_argument("--yarn-beta-slow", type=float, default=None, help=None)
    g.add_argument("--mtp-num-layers", type=int, default=None, help=None)
    g.add_argument("--mtp-loss-scaling-factor", type=float, default=0.1, help=None)
    g.add_argument("--yarn-correction-range-round-to-int", action="store_true", default=None, help=None)
    g.add_argument("--no-yarn-correction-range-round-to-int", action="store_false",
                   dest="yarn_correction_range_round_to_int", help=None)
    g.add_argument("--window-size", type=int_tuple, default=None, help=None)
    g.add_argument("--window-attn-skip-freq", type=int_or_pattern, default=None, help=None)
    g.add_argument("--no-rope-freq", type=int_or_pattern, default=None, help=None)
    g.add_argument("--disable-bias-linear", action="store_false", dest="add_bias_linear", help=None)
    g.add_argument("--add-qkv-bias", action="store_true", help=None)
    g.add_argument("--apply-query-key-layer-scaling", action="store_true", help=None)
    g.add_argument("--attention-backend", type=str, default="auto", choices=ATTENTION_BACKENDS, help=None)
    return parser


def add_transformer_impl_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Which module implementation builds the layers (the fp8 flags are in the precision group)."""
    g = parser.add_argument_group(title="transformer-engine")
    g.add_argument("--transformer-impl", type=str, default="transformer_engine",
                   choices=["transformer_engine", "local", "inference_optimized"],
                   help="Layer implementation. The pure-PyTorch 'local' layers are always used here, whatever "
                        "the value (Transformer Engine is never imported).")
    g.add_argument("--spec", type=str, nargs="*", default=None,
                   help="'<module> <function>' returning a ModuleSpec, or 'local'.")
    return parser


def add_moe_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Mixture-of-experts flags."""
    g = parser.add_argument_group(title="moe")
    g.add_argument("--num-experts", type=int, default=None, help=None)
    g.add_argument("--moe-layer-freq", type=int_or_pattern, default=1, help=None)
    g.add_argument("--moe-ffn-hidden-size", type=int, default=None, help=None)
    g.add_argument("--moe-shared-expert-intermediate-size", type=int, default=None, help=None)
    g.add_argument("--moe-shared-expert-overlap", action="store_true",
                   help="Overlap shared-expert compute with dispatch.")
    g.add_argument("--moe-shared-expert-gate", action="store_true", help=None)
    g.add_argument("--moe-apply-probs-on-input", action="store_true", help=None)
    g.add_argument("--moe-grouped-gemm", action="store_true", help=None)
    g.add_argument("--moe-router-load-balancing-type", type=str, default="aux_loss",
                   choices=["aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "quantile_balancing", "none"],
                   help=None)
    g.add_argument("--moe-router-score-function", type=str, default="softmax",
                   choices=["softmax", "sigmoid", "sqrtsoftplus"], help=None)
    g.add_argument("--moe-router-topk", type=int, default=2, help=None)
    g.add_argument("--moe-router-pre-softmax", action="store_true", help=None)
    g.add_argument("--moe-router-num-groups", type=int, default=None, help=None)
    g.add_argument("--moe-router-group-topk", type=int, default=None, help=None)
    g.add_argument("--moe-router-topk-scaling-factor", type=float, default=None, help=None)
    g.add_argument("--moe-router-enable-expert-bias", action="store_true", help=None)
    g.add_argument("--moe-router-bias-update-rate", type=float, default=1e-3, help=None)
    g.add_argument("--moe-router-dtype", type=str, default=None, choices=["fp32", "fp64"], help=None)
    g.add_argument("--moe-aux-loss-coeff", type=float, default=0.0, help=None)
    g.add_argument("--moe-z-loss-coeff", type=float, default=None, help=None)
    g.add_argument("--moe-input-jitter-eps", type=float, default=None, help=None)
    g.add_argument("--moe-router-force-load-balancing", action="store_true", help=None)
    g.add_argument("--moe-token-dispatcher-type", type=str, default="allgather",
                   choices=["allgather", "alltoall", "flex"], help=None)
    g.add_argument("--moe-expert-capacity-factor", type=float, default=None, help=None)
    g.add_argument("--moe-pad-expert-input-to-capacity", action="store_true", help=None)
    g.add_argument("--moe-token-drop-policy", type=str, default="probs", choices=["probs", "position"], help=None)
    g.add_argument("--moe-layer-recompute", action="store_true", help="Recompute MoE layers in backward.")
    g.add_argument("--moe-permute-fusion", action="store_true", help="Fused token permutation.")
    g.add_argument("--moe-use-upcycling", action="store_true",
                   help="First run of an MoE model: build its experts from the dense checkpoint under --load, save "
                   "it as iteration 1 under --save, train on (docs/moe.md).")
    g.add_argument("--moe-upcycling-granularity", type=int, default=1,
                   help="With --moe-use-upcycling: how many experts share one dense MLP's FFN (the dense FFN is "
                   "--ffn-hidden-size times this).")
    g.add_argument("--moe-per-layer-logging", action="store_true", help=None)
    return parser


__all__ = ["add_network_size_args", "add_transformer_impl_args", "add_moe_args"]
