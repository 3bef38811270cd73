"""Help text for flags that map onto a ``TransformerConfig`` field: the field's docstring.

House rule: a config field's docstring *is* the flag's help, written once. Dataclass field
docstrings are not kept at run time, so this module reads them from the class source with
``ast`` (the string literal statement right after each annotated field), walking the MRO so
``ModelParallelConfig`` fields are included. A flag defined with ``help=None`` whose
destination (or its renamed config field, see ``config_from_args.ARG_TO_CONFIG_FIELD``) is a
documented field gets that docstring; off switches (``store_false``) get "Turn off: ...".
"""

from __future__ import annotations

import argparse
import ast
import functools
import inspect
import re
import textwrap
from typing import Dict

from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.training.config_from_args import ARG_TO_CONFIG_FIELD

# Flags that mirror a TransformerConfig field but keep help of their own, and why. Every other
# mirrored flag is defined with help=None (off switches, ``store_false``, describe turning
# the feature off and keep theirs); tests/training/arguments_groups/test_config_help.py
# holds the parser to this.
FLAGS_WITH_OWN_HELP: Dict[str, str] = {
    "--ffn-hidden-size": "the command line derives the default from --swiglu; the config alone defaults to 4h",
    "--num-query-groups": "Megatron's default 1 counts only with --group-query-attention; the config's None "
                          "means one group per head",
}

# Mirrored flags whose parser default is not the field's default, and why. Any other
# difference fails the test above.
DEFAULTS_UNLIKE_THE_FIELD: Dict[str, str] = {
    "num_layers": "required on the command line (None until given); the field has no usable default",
    "hidden_size": "required on the command line (None until given); the field has no usable default",
    "num_attention_heads": "required on the command line (None until given); the field has no usable default",
    "num_query_groups": "Megatron's default 1, passed to the config only with --group-query-attention",
    "gradient_accumulation_fusion": "on by default in Megatron; the field defaults off for library use "
                                    "without the fused kernel",
    "use_cpu_initialization": "Megatron leaves it None; the config builder then keeps the field's default",
    "attention_softmax_in_fp32": "the flag only turns fp32 softmax on; off keeps the field's default "
                                 "(config_from_args)",
    "overlap_p2p_comm": "Megatron's default (on, for the interleaved pipeline); derived values turn it off "
                        "without one",
    "cp_comm_type": "Megatron's default ['p2p']; the field's None means p2p",
    "cross_entropy_loss_fusion": "on for runs on a GPU (1.34x gpt2-124m on one H100), off on CPU and with "
                                 "--deterministic-mode unless given; --no-cross-entropy-loss-fusion turns it off",
    **{name: "Megatron leaves it None; the config builder then keeps the field's (DeepSeek-V3's) value"
       for name in ("yarn_original_max_position_embeddings", "yarn_beta_fast", "yarn_beta_slow",
                    "yarn_correction_range_round_to_int")},
}

# "(--num-layers)" at the end of a docstring names the flag itself: redundant in --help.
_OWN_FLAG = re.compile(r"\s*\((--[a-z0-9-]+)\)")


def field_docstrings(cls: type) -> Dict[str, str]:
    """Map each annotated field of ``cls`` and its bases to its docstring (one line)."""
    docs: Dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        class_node = ast.parse(source).body[0]
        if not isinstance(class_node, ast.ClassDef):
            continue
        body = class_node.body
        for stmt, nxt in zip(body, body[1:]):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


@functools.lru_cache(maxsize=1)
def _transformer_docs() -> Dict[str, str]:
    return field_docstrings(TransformerConfig)


def _clean(doc: str, option_strings) -> str:
    """Drop a parenthetical naming one of the action's own flags; escape % for argparse."""

    def drop_own(match: re.Match) -> str:
        return "" if match.group(1) in option_strings else match.group(0)

    return _OWN_FLAG.sub(drop_own, doc).replace("%", "%%")


def fill_help_from_config(parser: argparse.ArgumentParser) -> None:
    """Give every action that has no help the docstring of its TransformerConfig field."""
    docs = _transformer_docs()
    for action in parser._actions:
        if action.help:
            continue
        field = ARG_TO_CONFIG_FIELD.get(action.dest, action.dest)
        doc = docs.get(field)
        if doc is None:
            continue
        text = _clean(doc, action.option_strings)
        if isinstance(action, argparse._StoreFalseAction):
            text = "Turn off: " + text
        action.help = text
