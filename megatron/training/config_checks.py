"""Argument checks that the core configs make themselves.

``TransformerConfig`` (with its parallel, MoE and FP8 rules), ``OptimizerConfig`` and
``DistributedDataParallelConfig`` check their fields when built. The model, the optimizer and
the data-parallel wrapper are built after torch.distributed starts, so a rule that only the
config knows would fail there, on every rank, with a traceback. Building the configs once from
the validated arguments, before any process group exists, makes every such rule fail during
argument checks with its one message (``user_errors`` turns it into exit code 2). The configs
built here are thrown away: the model builder makes its own from the same arguments.
"""

from __future__ import annotations

import argparse

from megatron.training.config_from_args import (
    core_transformer_config_from_args,
    get_ddp_config,
    get_megatron_optimizer_config,
)


def check_configs(args: argparse.Namespace) -> None:
    """Build each core config from ``args`` (validated and derived); raises the config's
    ValueError, which names the flag, the value and the fix."""
    core_transformer_config_from_args(args)
    get_megatron_optimizer_config(args)
    get_ddp_config(args)
