"""Hybrid (Mamba-2 + attention + MLP) model flags: Megatron's names and defaults.

The layer kinds come from --hybrid-layer-pattern (current Megatron) or, for older scripts,
from --hybrid-attention-ratio / --hybrid-mlp-ratio / --hybrid-override-pattern. Only
pretrain_mamba.py (and pretrain_hybrid.py) read them.
"""

from __future__ import annotations

import argparse


def add_hybrid_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--hybrid-* layer layout and --mamba-* mixer shape."""
    g = parser.add_argument_group(title="hybrid and mamba")
    # default None (not False) so that pretrain_hybrid.py's args_defaults can turn it on.
    g.add_argument("--is-hybrid-model", action="store_true", default=None,
                   help="The model is a hybrid (Mamba) stack; set by pretrain_hybrid.py. Selects the hybrid FLOP count, "
                        "and the hybrid model in tools/run_text_generation_server.py.")
    g.add_argument("--hybrid-layer-pattern", type=str, default=None,
                   help="One symbol per layer: M Mamba-2, * attention, - MLP, E MoE; '|' cuts pipeline stages.")
    g.add_argument("--hybrid-attention-ratio", type=float, default=0.0,
                   help="Older layout flag: fraction of attention layers, spread evenly among Mamba layers.")
    g.add_argument("--hybrid-mlp-ratio", type=float, default=0.0,
                   help="Older layout flag: fraction of MLP layers, spread evenly among the remaining Mamba layers.")
    g.add_argument("--hybrid-override-pattern", type=str, default=None,
                   help="Older layout flag: the layer pattern (no '|'), overriding the ratios.")
    g.add_argument("--mamba-state-dim", type=int, default=128, help="State dimension of each SSM head.")
    g.add_argument("--mamba-head-dim", type=int, default=64, help="Channels per SSM head.")
    g.add_argument("--mamba-num-groups", type=int, default=8, help="Groups sharing B and C (divides the heads).")
    g.add_argument("--mamba-num-heads", type=int, default=None,
                   help="SSM heads; default 2 * hidden size / --mamba-head-dim.")
    return parser
