"""CPU offloading of activations (--cpu-offloading-num-layers).

The tensors that autograd saves for backward inside the first N transformer layers of the
stack are copied to (pinned) CPU memory as they are saved and copied back when backward
needs them (``torch.autograd.graph.save_on_cpu``). The values are the same tensors, so the
losses and gradients are bit-identical to a run without offloading; the price is the
device-host traffic of every saved activation of those layers.

Megatron's rules: fewer layers than the model has, no pipeline parallelism, no activation
recompute (recompute already keeps only each layer's input).
"""

from __future__ import annotations

import contextlib

import torch


def check_cpu_offloading(config) -> None:
    n = config.cpu_offloading_num_layers
    if n == 0:
        return
    if n < 0 or n >= config.num_layers:
        raise ValueError(f"--cpu-offloading-num-layers {n} must be in [0, --num-layers {config.num_layers}): "
                         "offload fewer layers than the model has")
    if config.pipeline_model_parallel_size > 1:
        raise ValueError("--cpu-offloading-num-layers does not work with pipeline parallelism (as in Megatron): "
                         "drop it or use --pipeline-model-parallel-size 1")
    if config.recompute_granularity is not None:
        raise ValueError("--cpu-offloading-num-layers does not work with activation recompute (as in Megatron): "
                         "drop one of --cpu-offloading-num-layers and --recompute-granularity/--recompute-activations")


def offloading_context(enabled: bool):
    """Context in which saved activations live on the CPU (a no-op when not ``enabled``)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())
