"""The language-model constructor arguments every family reads from the command line.

GPTModel, BertModel and MambaModel share the embedding and output layer (``LanguageModule``),
so they take the same vocabulary, position, pipeline-stage and output arguments; each
family's ``model_provider`` adds only its own."""

from __future__ import annotations

import argparse
from typing import Any, Dict


def language_model_kwargs(args: argparse.Namespace, pre_process: bool, post_process: bool) -> Dict[str, Any]:
    """Vocabulary, positions, stage role and output settings of this stage's model."""
    return dict(
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
    )
