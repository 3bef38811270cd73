"""Activation offloading flag (megatron.core.transformer.activation_offload)."""

from __future__ import annotations

import argparse


def add_activation_offload_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group(title="activation offloading")
    # help: the TransformerConfig field's docstring (config_help)
    g.add_argument("--cpu-offloading-num-layers", type=int, default=0, help=None)
    return parser
