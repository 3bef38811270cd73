"""No Megatron flag is ignored silently: each parsed flag is acted on somewhere, refused with
an error naming it, or reported as having no effect (megatron/training/unimplemented_flags.py)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from megatron.training.arguments import build_parser, parse_and_validate
from megatron.training.flag_table import is_table_action
from megatron.training.unimplemented_flags import (
    OTHER_MODEL_FAMILIES,
    REFUSED,
    WITHOUT_EFFECT,
    check_unimplemented,
)

REPO = Path(__file__).resolve().parents[2]
BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--max-position-embeddings", "32", "--micro-batch-size", "1", "--train-iters", "1"]
# Where a flag's value is only checked or derived, not acted on.
ARGUMENT_MODULES = ("arguments.py", "argument_checks.py", "derived_args.py", "unimplemented_flags.py",
                    "flag_table.py")
# Read under a name built at run time.
READ_BY_BUILT_NAME = {"train_data_path", "valid_data_path", "test_data_path"}  # datasets/blend_args.py


def _defaults():
    return build_parser().parse_known_args([])[0]


def _code_outside_argument_modules() -> str:
    files = [f for f in (REPO / "megatron").rglob("*.py")
             if "arguments_groups" not in f.parts and f.name not in ARGUMENT_MODULES]
    files += list(REPO.glob("pretrain_*.py")) + list((REPO / "tools").rglob("*.py"))
    return "\n".join(f.read_text() for f in files)


def test_every_flag_is_used_refused_or_reported():
    code = _code_outside_argument_modules()
    listed = set(REFUSED) | set(WITHOUT_EFFECT) | set(OTHER_MODEL_FAMILIES) | READ_BY_BUILT_NAME
    silent = []
    for action in build_parser()._actions:
        if not action.option_strings or action.dest == "help" or action.dest in listed or is_table_action(action):
            continue
        if not re.search(rf"\b{re.escape(action.dest)}\b", code):
            silent.append(action.option_strings[0])
    assert not silent, (f"flags parsed but read nowhere outside the argument modules: {silent}; implement them "
                        "or list them in megatron/training/unimplemented_flags.py")
    # And nothing is listed as unimplemented that is in fact used (a stale entry would hide it).
    used = [dest for dest in set(REFUSED) | set(WITHOUT_EFFECT) if re.search(rf"\b{re.escape(dest)}\b", code)]
    assert not used, f"listed as unimplemented but read by the code: {used}"


def _set_value(default):
    if isinstance(default, bool):
        return not default
    if isinstance(default, list):
        return [1]
    if isinstance(default, int):
        return default + 1
    return "value"


# Every parsed flag is implemented or reported today, so REFUSED is empty; the refusal path
# is still checked, with a flag put on the list for the test.
_PROBE = {"log_energy": ("--log-energy", "energy is not logged here", "drop --log-energy")}


@pytest.mark.parametrize("dest", sorted(REFUSED) or sorted(_PROBE))
def test_refused_flag_is_an_error_naming_it(dest, monkeypatch):
    if dest not in REFUSED:
        monkeypatch.setitem(REFUSED, dest, _PROBE[dest])
    defaults = _defaults()
    args = parse_and_validate(BASE)
    setattr(args, dest, _set_value(getattr(defaults, dest)))
    flag = REFUSED[dest][0]
    with pytest.raises(ValueError, match=rf"^{re.escape(flag)} .*is not supported: .*Fix: "):
        check_unimplemented(args, defaults)


def test_flags_without_effect_are_reported_once_and_accepted(caplog):
    with caplog.at_level(logging.WARNING):
        parse_and_validate(BASE + ["--use-flash-attn", "--log-energy", "--use-sharp"])
    warnings = [r.getMessage() for r in caplog.records if "no effect here" in r.getMessage()]
    assert len(warnings) == 1
    for flag in ("--use-flash-attn", "--log-energy", "--use-sharp"):
        assert flag in warnings[0]


def test_defaults_and_equivalent_values_are_silent(caplog):
    with caplog.at_level(logging.WARNING):
        parse_and_validate(BASE + ["--recompute-modules", "core_attn", "--transformer-impl", "local"])
    assert not [r for r in caplog.records if "no effect here" in r.getMessage()]


def test_a_refused_flag_on_the_command_line_stops_validation():
    with pytest.raises(ValueError, match=r"^--init-model-with-meta-device True: is not supported"):
        parse_and_validate(BASE + ["--init-model-with-meta-device"])
