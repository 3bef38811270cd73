"""The pre-flight dry run's flags (not Megatron's: it has no dry run)."""

from __future__ import annotations

import argparse


def add_dry_run_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Plan a run without running it (megatron/training/dry_run.py)."""
    g = parser.add_argument_group(title="dry run")
    g.add_argument("--dry-run", action="store_true",
                   help="Check the flags, build the layout and the model on the meta device in one process "
                        "(no GPU), print parameters and estimated memory per rank, and exit.")
    g.add_argument("--dry-run-world-size", type=int, default=None,
                   help="Ranks the dry run plans for; default WORLD_SIZE, else 1.")
    return parser
