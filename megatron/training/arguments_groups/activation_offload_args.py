"""Activation offloading flag (megatron.core.transformer.activation_offload)."""

from __future__ import annotations

import argparse


def add_activation_offload_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group(title="activation offloading")
    g.add_argument("--cpu-offloading-num-layers", type=int, default=0,
                   help="Keep the activations the first N transformer layers save for backward in CPU memory "
                        "(no pipeline parallelism, no recompute).")
    return parser
