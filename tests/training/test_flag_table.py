"""Every Megatron-LM flag is understood: parsed, and implemented, refused or reported.

The inventory (tests/training/data/megatron_head_flags.txt) lists every option string of
Megatron-LM's training parser. Each must be defined by the argument groups or by the flag
table (megatron/training/flag_table.py); a table entry must disappear once the real parser
defines its flag, so that a flag implemented later never stays "refused" by mistake.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

import pytest

from megatron.training.arguments import build_parser, parse_and_validate
from megatron.training.arguments_groups import add_megatron_arguments
from megatron.training.flag_table import ALIAS, NO_EFFECT, REFUSED, TABLE, is_table_action

INVENTORY = Path(__file__).parent / "data" / "megatron_head_flags.txt"
BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--max-position-embeddings", "32", "--micro-batch-size", "1", "--train-iters", "1"]


def _inventory():
    return [line.strip() for line in INVENTORY.read_text().splitlines() if line.strip() and line[0] != "#"]


def _options(parser):
    return {opt: action for action in parser._actions for opt in action.option_strings}


def _real_options():
    """Option strings the argument groups define, without the table."""
    return _options(add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)))


def test_every_megatron_flag_is_parsed():
    inventory = _inventory()
    assert len(inventory) == 878
    options = _options(build_parser())
    missing = [flag for flag in inventory if flag not in options]
    assert not missing, f"Megatron-LM flags neither defined nor in megatron/training/flag_table.py: {missing}"


def test_table_entries_are_not_defined_by_the_real_parser():
    real = _real_options()
    stale = [flag for flag, entry in TABLE.items() if entry.status != ALIAS and flag in real]
    assert not stale, f"now defined by the argument groups: delete these flag_table entries: {stale}"
    for flag, entry in TABLE.items():
        if entry.status == ALIAS:
            assert flag not in real and entry.instead in real, flag


def test_table_entries_are_megatron_flags_or_marked_legacy():
    inventory = set(_inventory())
    wrong = [flag for flag, entry in TABLE.items() if entry.legacy == (flag in inventory)]
    assert not wrong, f"legacy=True exactly for flags not in Megatron-LM HEAD's parser: {wrong}"


def test_flags_named_in_reasons_and_fixes_exist():
    options = _options(build_parser())
    named = {m for entry in TABLE.values() for m in re.findall(r"--[a-z0-9][a-z0-9-]*[a-z0-9]\b(?!-)",
                                                               f"{entry.reason} {entry.instead}")}
    assert named and not sorted(n for n in named if n not in options)


def test_a_real_definition_wins_over_the_table():
    def provider(parser):
        parser.add_argument("--bert-embedder-type", type=str, default=None)
        return parser

    action = _options(build_parser(provider))["--bert-embedder-type"]
    assert not is_table_action(action) and action.dest == "bert_embedder_type"
    assert is_table_action(_options(build_parser())["--bert-embedder-type"])


@pytest.mark.parametrize("flag", ["--checkpoint-activations", "--bert-embedder-type", "--pipeline-model-parallel-layout", "--inference-max-batch-size",
                                  "--logits-load-dir", "--fine-grained-activation-offloading"])
def test_refused_table_flag_names_itself_the_reason_and_the_fix(flag):
    entry = TABLE[flag]
    with pytest.raises(ValueError, match=rf"^{re.escape(flag)} .*is not supported: "
                                         rf"{re.escape(entry.reason)}\. Fix: {re.escape(entry.instead)}"):
        parse_and_validate(BASE + [flag, "1"])


def test_no_effect_flags_warn_once_and_leave_other_flags_alone(caplog):
    flags = ["--use-mcore-models", "--fp8-interval", "1024", "--cuda-graph-modules", "attn", "mlp"]
    with caplog.at_level(logging.WARNING):
        args = parse_and_validate(BASE + flags + ["--lr", "0.5"])
    assert args.lr == 0.5
    warnings = [r.getMessage() for r in caplog.records if "no effect here" in r.getMessage()]
    assert len(warnings) == 1
    for flag in ("--use-mcore-models", "--fp8-interval", "--cuda-graph-modules"):
        assert f"{flag}: {TABLE[flag].reason}" in warnings[0]


def test_values_that_mean_what_we_do_are_silent(caplog):
    with caplog.at_level(logging.WARNING):
        parse_and_validate(BASE + ["--DDP-impl", "local", "--data-impl", "mmap"])
    assert not [r for r in caplog.records if "no effect here" in r.getMessage()]
    with caplog.at_level(logging.WARNING):
        parse_and_validate(BASE + ["--DDP-impl", "torch"])
    assert [r for r in caplog.records if "--DDP-impl" in r.getMessage()]


def test_alias_behaves_as_its_flag():
    assert parse_and_validate(BASE + ["--disable-manual-gc-eval"]).manual_gc_eval is False
    assert parse_and_validate(BASE).manual_gc_eval is True


def test_every_status_is_known():
    assert {entry.status for entry in TABLE.values()} == {NO_EFFECT, REFUSED, ALIAS}
