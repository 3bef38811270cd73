"""Build the model chunks, wrap them for data parallelism, build optimizer and scheduler."""

from __future__ import annotations

import dataclasses
import inspect
import logging
from typing import Callable, List, Optional

import torch

from megatron.core.distributed import DistributedDataParallel
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.init_rng import layout_independent_initialization
from megatron.core.pipeline_parallel.tied_embeddings import sync_tied_embedding_weights
from megatron.core.process_groups import ProcessGroups
from megatron.training.checkpointing import check_save_directory, load_checkpoint
from megatron.training.config_from_args import (
    core_transformer_config_from_args,
    get_ddp_config,
    get_megatron_optimizer_config,
)
from megatron.training.fsdp2 import wrap_with_fsdp2
from megatron.training.global_vars import get_args
from megatron.training.head_lr import head_lr_kwargs
from megatron.training.rank_print import print_rank_0
from megatron.training.run_state import RunState
from megatron.training.upcycling import upcycle

logger = logging.getLogger(__name__)


def unwrap_model(model):
    """The innermost module(s) under data-parallel and precision wrappers."""
    if isinstance(model, list):
        return [unwrap_model(m) for m in model]
    while hasattr(model, "module"):
        model = model.module
    return model


def _count_parameters(chunks: List[torch.nn.Module]) -> int:
    return sum(p.numel() for m in chunks for p in m.parameters())


def _provider_takes_vp_stage(model_provider_func: Callable) -> bool:
    try:
        parameters = inspect.signature(model_provider_func).parameters
    except (TypeError, ValueError):
        return False
    return "vp_stage" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def build_model_chunks(model_provider_func: Callable, pg_collection: ProcessGroups,
                       vpp: Optional[int]) -> List[torch.nn.Module]:
    """This rank's model chunks: one, or ``vpp`` for the interleaved schedule.

    Chunk c is virtual stage ``c * PP + pp_rank``; it pre-processes (embedding) only as
    the very first virtual stage and post-processes (output layer, loss) only as the last.
    """
    first, last = pg_collection.is_pipeline_first_stage(), pg_collection.is_pipeline_last_stage()
    takes_vp_stage = _provider_takes_vp_stage(model_provider_func)
    if not vpp or vpp == 1:
        kwargs = {"vp_stage": None} if takes_vp_stage else {}
        model = model_provider_func(pre_process=first, post_process=last, **kwargs)
        return model if isinstance(model, list) else [model]
    if not takes_vp_stage:
        raise ValueError(
            f"--num-virtual-stages-per-pipeline-rank {vpp} (or --num-layers-per-virtual-pipeline-stage): "
            "the model provider must accept a vp_stage argument to build one chunk per virtual stage; "
            "add vp_stage=None to model_provider(pre_process, post_process)"
        )
    return [
        model_provider_func(pre_process=first and c == 0, post_process=last and c == vpp - 1, vp_stage=c)
        for c in range(vpp)
    ]


def get_model(model_provider_func: Callable, pg_collection: ProcessGroups, wrap_with_ddp: bool = True):
    """Call ``model_provider_func(pre_process, post_process[, vp_stage])`` for each chunk.

    Returns the list of this rank's model chunks, moved to the GPU when there is one and
    wrapped in DistributedDataParallel. With --use-cpu-initialization the weights do not
    depend on the parallel layout (``transformer.init_rng``). Tied input/output
    embeddings start equal on the first and last stage (``sync_tied_embedding_weights``).
    """
    args = get_args()
    init_seed = args.seed if args.use_cpu_initialization else None
    with layout_independent_initialization(init_seed):
        chunks = build_model_chunks(model_provider_func, pg_collection,
                                    getattr(args, "virtual_pipeline_model_parallel_size", None))
    for chunk in chunks:
        if torch.cuda.is_available():
            chunk.cuda(torch.cuda.current_device())
    sync_tied_embedding_weights(chunks, pg_collection)
    n_params = _count_parameters(chunks)
    print_rank_0(
        f" > number of parameters on (tensor, pipeline) model parallel rank "
        f"({pg_collection.rank('tp')}, {pg_collection.rank('pp')}): {n_params}"
    )
    if not wrap_with_ddp:
        return chunks
    config = core_transformer_config_from_args(args)
    ddp_config = get_ddp_config(args, num_parameters=n_params)
    if args.use_torch_fsdp2:
        return wrap_with_fsdp2(chunks, config, ddp_config, args, pg_collection)
    wrapped = [
        DistributedDataParallel(config, ddp_config, chunk, pg_collection=pg_collection,
                                disable_bucketing=(index > 0))
        for index, chunk in enumerate(chunks)
    ]
    for chunk in wrapped:
        chunk.broadcast_params()
    return wrapped


def get_optimizer_param_scheduler(optimizer, args) -> OptimizerParamScheduler:
    """Megatron's scheduler, with every horizon counted in samples."""
    if args.train_iters is not None:
        gbs = args.global_batch_size
        decay_steps = (args.lr_decay_iters or args.train_iters) * gbs
        wd_incr_steps = args.train_iters * gbs
        wsd_decay_steps = args.lr_wsd_decay_iters * gbs if args.lr_wsd_decay_iters else None
        if args.lr_warmup_fraction is not None:
            warmup_steps = args.lr_warmup_fraction * decay_steps
        else:
            warmup_steps = args.lr_warmup_iters * gbs
    else:
        decay_steps = args.lr_decay_samples or args.train_samples
        wd_incr_steps = args.train_samples
        wsd_decay_steps = args.lr_wsd_decay_samples
        if args.lr_warmup_fraction is not None:
            warmup_steps = args.lr_warmup_fraction * decay_steps
        else:
            warmup_steps = args.lr_warmup_samples
    return OptimizerParamScheduler(
        optimizer,
        init_lr=args.lr_warmup_init,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.start_weight_decay,
        end_wd=args.end_weight_decay,
        wd_incr_steps=wd_incr_steps,
        wd_incr_style=args.weight_decay_incr_style,
        use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=args.override_opt_param_scheduler,
        wsd_decay_steps=wsd_decay_steps,
        lr_wsd_decay_style=args.lr_wsd_decay_style,
    )


def setup_model_and_optimizer(model_provider_func: Callable, pg_collection: ProcessGroups,
                              run_state: Optional[RunState] = None):
    """(model chunks, optimizer, scheduler) for this rank.

    A checkpoint's iteration, FLOPs and data position go into ``run_state``; without one
    (Megatron's call), onto ``args``."""
    args = get_args()
    model = get_model(model_provider_func, pg_collection)
    optimizer_config = get_megatron_optimizer_config(args)
    head_lr = head_lr_kwargs(args.head_lr_mult, model)
    if args.skip_train:
        # Evaluation only: the optimizer exists so that --load restores a training checkpoint
        # as it is, but it never steps, so neither --lr nor a schedule horizon is needed.
        if optimizer_config.lr is None:
            optimizer_config = dataclasses.replace(optimizer_config, lr=0.0)
        optimizer = get_megatron_optimizer(optimizer_config, model, **head_lr)
        scheduler = None
    else:
        optimizer = get_megatron_optimizer(optimizer_config, model, **head_lr)
        scheduler = get_optimizer_param_scheduler(optimizer, args)
    # Loaded here, before the data iterators are built: they start at the checkpoint's
    # consumed-sample count.
    state = run_state if run_state is not None else RunState()
    if args.moe_use_upcycling:
        upcycle(model, optimizer, scheduler, model_provider_func, pg_collection, args, state, get_model)
    elif args.load or args.pretrained_checkpoint:
        load_checkpoint(model, optimizer, scheduler, args, pg_collection, run_state=state)
    check_save_directory(args, state.iteration)
    if run_state is None:
        state.publish(args)
    return model, optimizer, scheduler
