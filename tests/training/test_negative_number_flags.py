"""Negative values in exponent notation are values, not flags: ``--lr -1e-3`` once failed
with "expected one argument" (argparse before 3.13 only knows -1 and -1.5)."""

import pytest

from megatron.training.arguments import build_parser


@pytest.mark.parametrize("text, value", [("-1e-3", -1e-3), ("-2E+2", -200.0), ("-.5", -0.5), ("-1.5e-4", -1.5e-4)])
def test_negative_numbers_in_exponent_notation_parse_as_values(text, value):
    args, unknown = build_parser().parse_known_args(["--lr", text])
    assert args.lr == value and unknown == []


def test_a_misspelled_flag_is_still_not_taken_for_a_value():
    with pytest.raises(SystemExit):
        build_parser().parse_known_args(["--lr", "--min-lr"])
