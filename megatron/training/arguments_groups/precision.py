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
    _add_fp8_args(g)
    return parser


def _add_fp8_args(g) -> None:
    """FP8 GEMMs in the transformer layers (megatron.core.fp8; docs/fp8.md)."""
    g.add_argument("--fp8-format", type=str, default=None, dest="fp8", choices=["e4m3", "hybrid"], help=None)
    g.add_argument("--fp8-recipe", type=str, default="delayed",
                   choices=["delayed", "tensorwise", "mxfp8", "blockwise", "custom"], help=None)
    g.add_argument("--fp8-margin", type=int, default=0, help=None)
    g.add_argument("--fp8-amax-history-len", type=int, default=1, help=None)
    g.add_argument("--fp8-amax-compute-algo", type=str, default="most_recent", choices=["most_recent", "max"],
                   help=None)
    g.add_argument("--no-fp8-wgrad", action="store_false", dest="fp8_wgrad",
                   help="Run the weight-gradient GEMMs in high precision instead of FP8.")
    g.add_argument("--fp8-emulation", action="store_true", help=None)
    g.add_argument("--fp8-param-gather", action="store_true", help=None)
    g.add_argument("--first-last-layers-bf16", action="store_true", help=None)
    g.add_argument("--num-layers-at-start-in-bf16", type=int, default=1, help=None)
    g.add_argument("--num-layers-at-end-in-bf16", type=int, default=1, help=None)
