"""A flag that mirrors a TransformerConfig field takes its help from the field's docstring
and its default from the field, unless config_help lists the flag with a reason: the two
are written once, so they cannot drift apart."""

import argparse
import dataclasses

from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.training.arguments import build_parser
from megatron.training.arguments_groups import GROUP_ADDERS
from megatron.training.arguments_groups.config_help import (
    DEFAULTS_UNLIKE_THE_FIELD,
    FLAGS_WITH_OWN_HELP,
    field_docstrings,
)
from megatron.training.config_from_args import ARG_TO_CONFIG_FIELD

FIELDS = {f.name: f for f in dataclasses.fields(TransformerConfig)}


def _mirrored(parser: argparse.ArgumentParser):
    """(action, config field) for each flag whose destination is a TransformerConfig field."""
    for action in parser._actions:
        field = ARG_TO_CONFIG_FIELD.get(action.dest, action.dest)
        if action.option_strings and field in FIELDS:
            yield action, FIELDS[field]


def _raw_parser() -> argparse.ArgumentParser:
    """The flags as the argument groups define them, before help is filled from the fields."""
    parser = argparse.ArgumentParser()
    for adder in GROUP_ADDERS:
        parser = adder(parser)
    return parser


def _field_default(field: dataclasses.Field):
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def test_mirrored_flags_do_not_repeat_the_field_docstring():
    docs = field_docstrings(TransformerConfig)
    repeated = [
        action.option_strings[0] for action, field in _mirrored(_raw_parser())
        if field.name in docs and action.help is not None
        and not isinstance(action, argparse._StoreFalseAction)
        and action.option_strings[0] not in FLAGS_WITH_OWN_HELP
    ]
    assert not repeated, (f"{repeated} define their help inline: pass help=None so --help shows the "
                          "TransformerConfig field's docstring, or list the flag in FLAGS_WITH_OWN_HELP with why")


def test_mirrored_flags_show_the_field_docstring_in_help():
    docs = field_docstrings(TransformerConfig)
    for action, field in _mirrored(build_parser()):
        if field.name in docs and not isinstance(action, argparse._StoreFalseAction) \
                and action.option_strings[0] not in FLAGS_WITH_OWN_HELP:
            first_words = " ".join(docs[field.name].split()[:3])
            assert action.help.startswith(first_words), (action.option_strings, action.help)


def test_mirrored_flag_defaults_equal_the_field_defaults():
    differing = {
        action.dest: (action.default, _field_default(field)) for action, field in _mirrored(_raw_parser())
        if action.default != _field_default(field)
    }
    unexplained = {dest: values for dest, values in differing.items() if dest not in DEFAULTS_UNLIKE_THE_FIELD}
    assert not unexplained, (f"flag default vs field default {unexplained}: make them equal, or list the flag in "
                             "DEFAULTS_UNLIKE_THE_FIELD with why")
    stale = set(DEFAULTS_UNLIKE_THE_FIELD) - set(differing)
    assert not stale, f"{stale} are listed in DEFAULTS_UNLIKE_THE_FIELD but agree with the field now: remove them"


def test_own_help_entries_are_mirrored_flags():
    mirrored = {action.option_strings[0] for action, _ in _mirrored(_raw_parser())}
    assert set(FLAGS_WITH_OWN_HELP) <= mirrored
