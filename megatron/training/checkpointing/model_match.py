"""Whether a checkpoint was written by the same model as this run: the architecture
flags recorded in its args against this run's, and the vocabulary beyond padding.

Key and shape comparisons (``compare_with_checkpoint``) find that a checkpoint does not
fit; these name the flags that most likely explain it, and catch what shapes alone let
through (a vocabulary of another size, whose overlapping rows would load)."""

from __future__ import annotations

from typing import List, Optional

# Run attribute -> the flag that sets it.
ARCHITECTURE_FLAGS = {
    "num_layers": "--num-layers",
    "hidden_size": "--hidden-size",
    "ffn_hidden_size": "--ffn-hidden-size",
    "num_attention_heads": "--num-attention-heads",
    "group_query_attention": "--group-query-attention",
    "num_query_groups": "--num-query-groups",
    "kv_channels": "--kv-channels",
    "normalization": "--normalization",
    "add_bias_linear": "--disable-bias-linear",
    "add_qkv_bias": "--add-qkv-bias",
    "swiglu": "--swiglu",
    "squared_relu": "--squared-relu",
    "untie_embeddings_and_output_weights": "--untie-embeddings-and-output-weights",
    "position_embedding_type": "--position-embedding-type",
    "qk_layernorm": "--qk-layernorm",
    "qk_l2_norm": "--qk-l2-norm",
    "softmax_type": "--softmax-type",
    "multi_latent_attention": "--multi-latent-attention",
    "num_experts": "--num-experts",
    "moe_ffn_hidden_size": "--moe-ffn-hidden-size",
    "max_position_embeddings": "--max-position-embeddings",
    "vocab_size": "--vocab-size",
}


def differing_flags(saved_args, args) -> List[str]:
    """``flag: checkpoint X, this run Y`` for each architecture flag that differs."""
    if saved_args is None:
        return []
    out = []
    for name, flag in ARCHITECTURE_FLAGS.items():
        if not hasattr(saved_args, name) or not hasattr(args, name):
            continue
        saved, current = getattr(saved_args, name), getattr(args, name)
        if saved != current:
            out.append(f"{flag} ({name}): checkpoint {saved!r}, this run {current!r}")
    return out


def vocabulary_problem(saved_args, args) -> Optional[str]:
    """A vocabulary of another size (not just other padding) makes the embedding and
    output rows mean other tokens; the overlapping rows would load without a word."""
    if saved_args is None:
        return None
    saved, current = getattr(saved_args, "vocab_size", None), getattr(args, "vocab_size", None)
    if saved is not None and current is not None and saved != current:
        return f"--vocab-size: checkpoint {saved}, this run {current}"
    saved_padded = getattr(saved_args, "padded_vocab_size", None)
    current_padded = getattr(args, "padded_vocab_size", None)
    if saved_padded is None or current_padded is None:
        return None
    # Padding to --make-vocab-size-divisible-by x tensor-parallel size explains a
    # difference smaller than the larger of the two multiples; more is another vocabulary.
    multiples = [getattr(a, "make_vocab_size_divisible_by", 128) * getattr(a, "tensor_model_parallel_size", 1)
                 for a in (saved_args, args)]
    if abs(saved_padded - current_padded) >= max(multiples):
        return f"padded vocabulary: checkpoint {saved_padded} rows, this run {current_padded} (another tokenizer?)"
    return None
