"""Mixed-precision flags."""

from __future__ import annotations

import argparse


def add_mixed_precision_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """fp16 / bf16 training and loss scaling."""
    g = parser.add_argument_group(title="mixed precision")
    g.add_argument("--fp16", action="store_true", help=None)
    g.add_argument("--bf16", action="store_true", help=None)
    g.add_argument("--grad-reduce-in-bf16", action="store_true", help="Reduce gradients in bf16 instead of fp32.")
    g.add_argument("--loss-scale", type=float, default=None,
                   help="Static loss scale (fp16); dynamic loss scaling when not given.")
    g.add_argument("--initial-loss-scale", type=float, default=2**32, help="Initial dynamic loss scale.")
    g.add_argument("--min-loss-scale", type=float, default=1.0, help="Smallest dynamic loss scale.")
    g.add_argument("--loss-scale-window", type=float, default=1000,
                   help="Clean steps after which the dynamic loss scale doubles.")
    g.add_argument("--hysteresis", type=int, default=2, help="Overflows tolerated before the loss scale halves.")
    g.add_argument("--fp32-residual-connection", action="store_true", help=None)
    g.add_argument("--attention-softmax-in-fp32", action="store_true", help=None)
    g.add_argument("--accumulate-allreduce-grads-in-fp32", action="store_true",
                   help="Accumulate and all-reduce gradients in fp32 (implied by --bf16).")
    g.add_argument("--fp16-lm-cross-entropy", action="store_true",
                   help="Compute the LM cross entropy on fp16 logits (needs --fp16).")
    g.add_argument("--disable-bf16-reduced-precision-matmul", action="store_true",
                   help="Forbid reduced-precision reductions in bf16 matmuls.")
    return parser
