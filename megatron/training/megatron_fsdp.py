"""--use-megatron-fsdp: Megatron-FSDP's command line, run by this framework's own sharded
data-parallel implementations.

There is no Megatron-FSDP engine here. ``--data-parallel-sharding-strategy`` picks the
implementation that shards the same state:

=====================  ==========================================================
``optim_grads_params`` PyTorch FSDP2 (the --use-torch-fsdp2 path): weights, grads and
                       optimizer state sharded over the data x context parallel ranks
``optim_grads``        the distributed optimizer (--use-distributed-optimizer): the
                       optimizer state and fp32 main weights are sharded and grads are
                       reduce-scattered, but every rank keeps a full-size grad buffer
                       (Megatron-FSDP frees the other ranks' grad shards)
``optim``              the distributed optimizer, as in Megatron-FSDP's ``optim``
``no_shard``           plain data parallelism (grads all-reduced, nothing sharded)
=====================  ==========================================================

``resolve_megatron_fsdp`` checks Megatron-FSDP's rules and then sets the implementation's
own switches (``use_torch_fsdp2`` / ``use_distributed_optimizer``, and turns
``overlap_param_gather`` off where no separate parameter gather exists), so the rest of the
framework (model wrapping, optimizer, checkpoints, memory estimate) runs that
implementation unchanged; rank 0 logs one line saying what runs. Checkpoints are written
in ``--ckpt-format fsdp_dtensor`` (``checkpointing/save_formats.py``).
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Optional

logger = logging.getLogger(__name__)

FLAG = "--use-megatron-fsdp"
STRATEGY_FLAG = "--data-parallel-sharding-strategy"
CKPT_FORMAT = "fsdp_dtensor"
STRATEGIES = ("no_shard", "optim", "optim_grads", "optim_grads_params")
DEFAULT_STRATEGY = "optim_grads_params"
OUTER_STRATEGIES = ("no_shard", "optim")
OPTIMIZERS = ("adam", "sgd")

FSDP2, DISTRIBUTED_OPTIMIZER, DDP = "fsdp2", "distributed_optimizer", "ddp"
IMPLEMENTATION = {"optim_grads_params": FSDP2, "optim_grads": DISTRIBUTED_OPTIMIZER,
                  "optim": DISTRIBUTED_OPTIMIZER, "no_shard": DDP}

_WHAT_RUNS = {
    "optim_grads_params": "PyTorch FSDP2 (as --use-torch-fsdp2): weights, grads and optimizer state sharded "
                          "over the {n} data x context parallel rank(s), each layer's weights gathered just "
                          "before it runs",
    "optim_grads": "the distributed optimizer (as --use-distributed-optimizer): optimizer state and fp32 main "
                   "weights sharded over the {n} data x context parallel rank(s), grads reduce-scattered; every "
                   "rank still holds a full-size grad buffer (Megatron-FSDP's optim_grads frees it)",
    "optim": "the distributed optimizer (as --use-distributed-optimizer): optimizer state and fp32 main weights "
             "sharded over the {n} data x context parallel rank(s), grads reduce-scattered",
    "no_shard": "plain data parallelism: grads all-reduced over the {n} data x context parallel rank(s), nothing "
                "sharded",
}


def _refusal(flag: str, value, rule: str, fix: str) -> ValueError:
    from megatron.training.argument_checks import invalid  # the house error format

    return invalid(flag, value, rule, fix)


def implementation(args: argparse.Namespace) -> Optional[str]:
    """FSDP2, DISTRIBUTED_OPTIMIZER or DDP for a --use-megatron-fsdp run, else None."""
    if not args.use_megatron_fsdp:
        return None
    return IMPLEMENTATION[args.data_parallel_sharding_strategy]


def check_megatron_fsdp(args: argparse.Namespace) -> None:
    """Megatron-FSDP's rules that apply here, each refused with the flag and the fix."""
    if not args.use_megatron_fsdp:
        if args.ckpt_format == CKPT_FORMAT:
            raise _refusal("--ckpt-format", CKPT_FORMAT, "is the checkpoint format of Megatron-FSDP runs",
                           f"add {FLAG}, or use --ckpt-format torch_dist (the default), torch or torch_dcp "
                           "(with --use-torch-fsdp2)")
        return
    strategy = args.data_parallel_sharding_strategy
    instances = args.num_distributed_optimizer_instances
    rules = (
        (args.use_torch_fsdp2, "--use-torch-fsdp2", True,
         f"is another data-parallel implementation than {FLAG}",
         f"drop one of them ({FLAG} {STRATEGY_FLAG} optim_grads_params runs FSDP2 itself)"),
        (args.ckpt_format != CKPT_FORMAT, "--ckpt-format", args.ckpt_format,
         f"{FLAG} saves and loads --ckpt-format {CKPT_FORMAT} (as in Megatron-LM)",
         f"add --ckpt-format {CKPT_FORMAT}"),
        (args.optimizer not in OPTIMIZERS, "--optimizer", args.optimizer,
         f"{FLAG} takes the adam or sgd optimizer (as in Megatron-LM)", "use --optimizer adam or --optimizer sgd"),
        (args.outer_dp_sharding_strategy != "no_shard", "--outer-dp-sharding-strategy",
         args.outer_dp_sharding_strategy,
         "sharding the optimizer state across the replicas of hybrid sharding is not implemented here",
         "use --outer-dp-sharding-strategy no_shard (the default), or --data-parallel-sharding-strategy "
         "optim / optim_grads with --num-distributed-optimizer-instances N (sharded inside each instance, "
         "replicated across)"),
        (instances > 1 and strategy in ("optim_grads_params", "no_shard"), "--num-distributed-optimizer-instances",
         instances, f"hybrid sharding (HSDP) is not implemented for {STRATEGY_FLAG} {strategy}: "
         + ("FSDP2 shards over all data x context parallel ranks here" if strategy != "no_shard"
            else "no_shard shards nothing"),
         "drop --num-distributed-optimizer-instances, or use --data-parallel-sharding-strategy optim or "
         "optim_grads (the distributed optimizer: sharded inside each instance, replicated across)"),
    )
    for refused, flag, value, rule, fix in rules:
        if refused:
            raise _refusal(flag, value, rule, fix)


def resolve_megatron_fsdp(args: argparse.Namespace, world_size: int) -> Optional[str]:
    """Check, then set the switches of the implementation that runs (see the module
    docstring); returns the line rank 0 logs (what runs; without --use-megatron-fsdp, a
    warning about its strategy flags if they were given), or None."""
    check_megatron_fsdp(args)
    impl = implementation(args)
    if impl is None:
        given = [f"{flag} {value}" for flag, value, default in (
            (STRATEGY_FLAG, args.data_parallel_sharding_strategy, DEFAULT_STRATEGY),
            ("--outer-dp-sharding-strategy", args.outer_dp_sharding_strategy, "no_shard")) if value != default]
        return f"{' and '.join(given)}: no effect without {FLAG} (as in Megatron-LM)" if given else None
    strategy = args.data_parallel_sharding_strategy
    dropped = []
    if impl in (FSDP2, DDP):
        for dest, flag in (("use_distributed_optimizer", "--use-distributed-optimizer"),
                           ("overlap_param_gather", "--overlap-param-gather")):
            if getattr(args, dest):
                setattr(args, dest, False)
                dropped.append(flag)
    args.use_torch_fsdp2 = impl == FSDP2
    if impl == DISTRIBUTED_OPTIMIZER:
        args.use_distributed_optimizer = True
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    dp_cp = max(world_size // (tp * pp), 1)
    line = f"{FLAG} {STRATEGY_FLAG} {strategy} runs as {_WHAT_RUNS[strategy].format(n=dp_cp)}"
    if dropped:
        verbs = ("are", "take") if len(dropped) > 1 else ("is", "takes")
        line += (f"; {' and '.join(dropped)} {verbs[0]} part of Megatron-FSDP's recipe and {verbs[1]} no part here ("
                 + ("FSDP2 gathers each layer's weights itself" if impl == FSDP2 else "nothing is sharded") + ")")
    if impl == FSDP2 and os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS") == "1":
        line += ("; CUDA_DEVICE_MAX_CONNECTIONS=1 keeps FSDP2's gathers and reduce-scatters from overlapping "
                 "compute on GPUs (Megatron-FSDP asks for it unset): unset it")
    return line
