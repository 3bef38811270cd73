"""Fill-in-the-middle data flags (--fim-data and its options; Megatron-LM's spellings and defaults)."""

from __future__ import annotations

import argparse


def add_fim_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Rewrite GPT training samples into fill-in-the-middle form (docs/data.md)."""
    g = parser.add_argument_group(title="fill-in-the-middle data")
    g.add_argument("--fim-data", action="store_true",
                   help="Rewrite GPT samples into fill-in-the-middle (PSM/SPM) form as they are read.")
    g.add_argument("--fim-rate", type=float, default=0.5,
                   help="Probability that a document segment of a sample becomes a FIM example.")
    g.add_argument("--fim-spm-rate", type=float, default=0.5,
                   help="Probability that a FIM example is written suffix-prefix-middle (SPM) rather than PSM.")
    g.add_argument("--fim-split-sample", type=str, default=None,
                   help="Token at which a segment is cut into fragments, each made a FIM example on its own.")
    g.add_argument("--fim-fragment-rate", type=float, default=None,
                   help="Probability that each fragment becomes a FIM example (with --fim-split-sample).")
    g.add_argument("--fim-no-prefix", type=str, default=None,
                   help="Never rewrite a segment whose text starts with this string.")
    g.add_argument("--fim-prefix-token", type=str, default="<fim_prefix>", help="The FIM prefix token.")
    g.add_argument("--fim-middle-token", type=str, default="<fim_middle>", help="The FIM middle token.")
    g.add_argument("--fim-suffix-token", type=str, default="<fim_suffix>", help="The FIM suffix token.")
    g.add_argument("--fim-pad-token", type=str, default="<fim_pad>",
                   help="The token that pads a FIM sample back to its length.")
    g.add_argument("--fim-eod-token", type=str, default="<|endoftext|>",
                   help="The end-of-document token at which samples are cut into segments.")
    return parser
