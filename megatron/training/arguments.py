"""Megatron-LM's command line: ``parse_args`` and ``validate_args``.

Flag names, defaults and meanings are Megatron's, so launch scripts run unchanged. The flags
live in ``arguments_groups`` (one module per group), the checks in ``argument_checks`` and
the derived values in ``derived_args``. ``--yaml-cfg FILE`` replaces the command line
with Megatron's YAML config (``yaml_config``).

Unknown or misspelled flags exit with status 2 and name the nearest valid flags, unless
``ignore_unknown_args``. Abbreviations are refused (``allow_abbrev=False``, as in Megatron),
so ``--num-layer`` is an error rather than a silent prefix match. Megatron flags that are
parsed but not implemented are refused or reported, never ignored silently
(``unimplemented_flags``, ``flag_table``).
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
from typing import Callable, Dict, List, Optional, Sequence

from megatron.training.argument_checks import check_args
from megatron.training.arguments_groups import add_megatron_arguments
from megatron.training.arguments_groups.config_help import fill_help_from_config
from megatron.training.config_checks import check_configs
from megatron.training.derived_args import apply_defaults, derive_args
from megatron.training.deterministic import check_deterministic
from megatron.training.eval_batches import eval_batches
from megatron.training.flag_table import add_table_flags
from megatron.training.megatron_fsdp import resolve_megatron_fsdp
from megatron.training.unimplemented_flags import annotate_help, check_unimplemented

logger = logging.getLogger(__name__)

ExtraArgsProvider = Callable[[argparse.ArgumentParser], argparse.ArgumentParser]


_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def build_parser(extra_args_provider: Optional[ExtraArgsProvider] = None) -> argparse.ArgumentParser:
    """The full Megatron parser, plus the script's own flags from ``extra_args_provider``, plus
    the flag table's entries for every Megatron flag neither of them defines (last, so a real
    definition always wins)."""
    # Every flag's help ends with its default, so --help answers "what if I leave it out".
    # A short usage line: the generated one lists every flag (hundreds of lines) above the
    # one line that says what went wrong.
    parser = argparse.ArgumentParser(description="Megatron-LM Arguments", allow_abbrev=False,
                                     usage="%(prog)s [Megatron-LM flags] (--help lists them)",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # argparse before Python 3.13 reads "-1e-3" as a flag, not a negative number, so
    # "--lr -1e-3" failed with "expected one argument"; accept exponents too.
    parser._negative_number_matcher = _NEGATIVE_NUMBER
    parser = add_megatron_arguments(parser)
    if extra_args_provider is not None:
        parser = extra_args_provider(parser)
        fill_help_from_config(parser)
    annotate_help(parser)
    return add_table_flags(parser)


def suggest_flags(parser: argparse.ArgumentParser, unknown: str, limit: int = 3) -> List[str]:
    """The parser's option strings closest to ``unknown`` (difflib ratio >= 0.6)."""
    options = [opt for action in parser._actions for opt in action.option_strings if opt.startswith("--")]
    return difflib.get_close_matches(unknown.split("=", 1)[0], options, n=limit, cutoff=0.6)


def _unknown_args_message(parser: argparse.ArgumentParser, unknown: Sequence[str]) -> str:
    lines = [f"unrecognized arguments: {' '.join(unknown)}"]
    for token in unknown:
        if not token.startswith("-"):
            continue
        close = suggest_flags(parser, token)
        hint = f"did you mean {' or '.join(close)}?" if close else "no similar flag exists; see --help"
        lines.append(f"  {token.split('=', 1)[0]}: {hint}")
    return "\n".join(lines)


def parse_args(
    extra_args_provider: Optional[ExtraArgsProvider] = None,
    ignore_unknown_args: bool = False,
    args: Optional[Sequence[str]] = None,
) -> argparse.Namespace:
    """Parse ``args`` (default ``sys.argv[1:]``) into a Namespace with Megatron's defaults.

    Nothing is validated or derived here; call ``validate_args`` next.
    """
    parser = build_parser(extra_args_provider)
    namespace, unknown = parser.parse_known_args(args)
    if unknown and not ignore_unknown_args:
        parser.error(_unknown_args_message(parser, unknown))
    if namespace.yaml_cfg is not None:
        from megatron.training.yaml_config import apply_yaml

        namespace = apply_yaml(parser, namespace, namespace.yaml_cfg)
    return namespace


def _env_int(name: str, fallback: int) -> int:
    value = os.getenv(name)
    return int(value) if value not in (None, "") else fallback


def validate_args(
    args: argparse.Namespace,
    defaults: Optional[Dict] = None,
    world_size: Optional[int] = None,
    rank: Optional[int] = None,
) -> argparse.Namespace:
    """Apply script defaults, check every rule, then add derived values; returns ``args``.

    ``world_size``/``rank`` default to ``args.world_size``/``args.rank`` when a caller set
    them, else to the WORLD_SIZE/RANK environment variables (torchrun), else 1/0.
    Raises ``ValueError`` naming the offending flag, its value, the rule and the fix.
    """
    if world_size is None:
        world_size = getattr(args, "world_size", None) or _env_int("WORLD_SIZE", 1)
    if rank is None:
        rank = getattr(args, "rank", None)
        rank = rank if rank is not None else _env_int("RANK", 0)
    args.rank = rank
    apply_defaults(args, defaults)
    without_effect = check_unimplemented(args, build_parser().parse_known_args([])[0])
    if without_effect and (rank == 0 or args.fake_process_group):
        logger.warning("these flags have no effect here:\n  %s", "\n  ".join(without_effect))
    what_runs = resolve_megatron_fsdp(args, world_size)  # before the rules of what it maps to
    if what_runs and (rank == 0 or args.fake_process_group):
        (logger.info if args.use_megatron_fsdp else logger.warning)("%s", what_runs)
    check_args(args, world_size)
    check_deterministic(args)
    args = derive_args(args, world_size, rank)
    eval_batches(args, args.data_parallel_size)  # refused here, before anything is built
    check_configs(args)  # the configs' own rules, before torch.distributed starts
    return args


def parse_and_validate(
    argv: Optional[Sequence[str]] = None,
    extra_args_provider: Optional[ExtraArgsProvider] = None,
    defaults: Optional[Dict] = None,
    world_size: Optional[int] = None,
    rank: Optional[int] = None,
) -> argparse.Namespace:
    """Convenience for tests and tools: ``validate_args(parse_args(...))``."""
    namespace = parse_args(extra_args_provider, args=argv)
    return validate_args(namespace, defaults, world_size=world_size, rank=rank)
