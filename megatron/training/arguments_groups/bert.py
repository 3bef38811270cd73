"""BERT flags (Megatron's names and defaults), and the post-LayerNorm layer variant."""

from __future__ import annotations

import argparse


def add_bert_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--bert-no-binary-head, --bert-load and --transformer-block-type.

    --mask-prob and --short-seq-prob live with the data flags, as in Megatron."""
    g = parser.add_argument_group(title="bert")
    g.add_argument("--bert-no-binary-head", action="store_false", dest="bert_binary_head",
                   help="Disable BERT's binary (sentence-order) head and its pooler; the model then has no "
                        "token-type embeddings and each sample is one segment.")
    g.add_argument("--bert-load", type=str, default=None,
                   help="Directory of a BertModel checkpoint to start ICT/REALM from (pretrain_bert.py does "
                        "not read it, as in Megatron).")
    g.add_argument("--transformer-block-type", type=str, default="pre_ln", choices=["pre_ln", "post_ln"],
                   help=None)
    return parser
