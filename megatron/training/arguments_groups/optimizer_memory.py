"""Optimizer-memory flags: the precision-aware optimizer and optimizer CPU offload
(megatron.core.optimizer.precision_aware_adam; docs/optimizer_memory.md).

Help comes from the ``OptimizerConfig`` field docstrings where Megatron's is no clearer."""

from __future__ import annotations

import argparse

from megatron.core.optimizer.optimizer_dtypes import ALLOWED


def add_optimizer_memory_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group(title="optimizer memory")
    g.add_argument("--use-precision-aware-optimizer", action="store_true",
                   help="Keep main params, main grads and Adam moments in the dtypes given by --main-grads-dtype, "
                        "--main-params-dtype, --exp-avg-dtype and --exp-avg-sq-dtype (needs "
                        "--use-distributed-optimizer).")
    helps = {
        "main_grads_dtype": "Dtype of the main grads (bf16: grads are accumulated and reduced in bf16).",
        "main_params_dtype": "Dtype of the main (master) params; fp16 is stored with a per-tensor scale.",
        "exp_avg_dtype": "Dtype of Adam's exp_avg; fp16 and fp8 (E4M3) are stored with a per-tensor scale.",
        "exp_avg_sq_dtype": "Dtype of Adam's exp_avg_sq; fp16 and fp8 (E4M3) are stored with a per-tensor scale.",
    }
    for dest, (flag, choices) in ALLOWED.items():
        g.add_argument(flag, type=str, default="fp32", choices=list(choices), help=helps[dest])
    g.add_argument("--optimizer-cpu-offload", action="store_true",
                   help="Keep the main params and Adam state of a fraction of the params on the CPU and step them "
                        "there (needs --use-precision-aware-optimizer).")
    g.add_argument("--optimizer-offload-fraction", type=float, default=1.0,
                   help="Fraction of the params (by element count, in param-group order) offloaded to the CPU.")
    g.add_argument("--overlap-cpu-optimizer-d2h-h2d", action="store_true",
                   help="Overlap the CPU step with the grad (device to host) and param (host to device) copies.")
    g.add_argument("--use-torch-optimizer-for-cpu-offload", action="store_true",
                   help="Use torch.optim.AdamW for the CPU step.")
    g.add_argument("--no-pin-cpu-grads", action="store_false", dest="pin_cpu_grads",
                   help="Do not pin the CPU copies of offloaded grads.")
    g.add_argument("--no-pin-cpu-params", action="store_false", dest="pin_cpu_params",
                   help="Do not pin the CPU main params of offloaded params.")
    return parser
