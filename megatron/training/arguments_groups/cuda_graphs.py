"""CUDA graph flags (Megatron's names and defaults)."""

from __future__ import annotations

import argparse


def add_cuda_graph_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--cuda-graph-impl, --cuda-graph-scope and --cuda-graph-warmup-steps."""
    g = parser.add_argument_group(title="cuda graphs")
    g.add_argument("--cuda-graph-impl", type=str, default="none",
                   choices=["none", "local", "transformer_engine", "full_iteration"],
                   help="CUDA graph capture. 'full_iteration' (or 'local' with --cuda-graph-scope "
                        "full_iteration) replays the forward and backward of every training step from one "
                        "graph; the per-layer graphs of 'local' and 'transformer_engine' are not built here.")
    g.add_argument("--cuda-graph-scope", type=str, nargs="+", default=None,
                   help="What to capture; only 'full_iteration' (the whole forward-backward) is built here.")
    g.add_argument("--cuda-graph-warmup-steps", type=int, default=3,
                   help="Eager training steps before the capture.")
    return parser
