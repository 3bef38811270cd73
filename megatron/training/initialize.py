"""Start a run: parse flags, join the process group, build parallel groups, seed."""

from __future__ import annotations

import functools
import logging
import random
from datetime import timedelta

import numpy
import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.fake_backend import is_fake
from megatron.core.num_microbatches_calculator import init_num_microbatches_calculator
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from megatron.training.arguments import parse_args, validate_args
from megatron.training.checkpointing.checkpoint_args import load_args_from_checkpoint
from megatron.training.deterministic import apply_deterministic
from megatron.training.distributed_env import detect_distributed_env, export_env
from megatron.training.fake_process_group import init_fake_process_group, rehearsal_notice
from megatron.training.global_vars import set_global_variables, set_timers, set_tokenizer
from megatron.core.timers import Timers
from megatron.training.rank_print import print_rank_0
from megatron.training.tokenizer import build_tokenizer, vocab_size_with_padding

logger = logging.getLogger(__name__)


def initialize_megatron(extra_args_provider=None, args_defaults=None, ignore_unknown_args=False,
                        parsed_args=None):
    """Everything before the model is built; returns the parsed arguments.

    With ``--lazy-mpu-init`` (for launchers that set up distribution themselves) the flags are
    parsed, validated and installed, but torch.distributed, the model-parallel groups and the
    seeds are left alone, and the function that completes them is returned instead
    (``finish()``, no arguments, returns nothing; it joins torch.distributed only if nobody
    has); the flag also turns on ``--use-cpu-initialization``."""
    denv = detect_distributed_env()
    export_env(denv)
    args = parsed_args if parsed_args is not None else parse_args(extra_args_provider, ignore_unknown_args)
    # Logging first, so that the values taken from a checkpoint and the flag warnings show.
    # A --fake-process-group process is the only one of its job: it speaks for all ranks.
    _setup_logging(args, 0 if getattr(args, "fake_process_group", False) else denv.rank)
    if getattr(args, "use_checkpoint_args", False):
        args, _ = load_args_from_checkpoint(args)
    if getattr(args, "lazy_mpu_init", None):
        # finish() picks the CUDA device: weights are initialized on the CPU, as Megatron does here.
        args.use_cpu_initialization = True
    args = validate_args(args, args_defaults or {})
    set_global_variables(args)
    tokenizer = build_tokenizer(args)
    set_tokenizer(tokenizer)
    # Megatron's scripts read the padded size from args; it is derived here, once.
    args.padded_vocab_size = vocab_size_with_padding(tokenizer.vocab_size, args)
    apply_deterministic(args)  # NCCL reads NCCL_ALGO when the process group starts
    # None: the world group of torch.distributed, whenever it is joined.
    set_timers(Timers(args.timing_log_level, args.timing_log_option, group=None))
    init_num_microbatches_calculator(
        args.rank,
        args.rampup_batch_size,
        args.global_batch_size,
        args.micro_batch_size,
        args.data_parallel_size,
        getattr(args, "decrease_batch_size_if_needed", False),
        step_batch_size_schedule=getattr(args, "step_batch_size_schedule", None),
        seq_length=args.seq_length,
    )
    if getattr(args, "disable_bf16_reduced_precision_matmul", False):
        # cuBLAS may otherwise accumulate bf16 GEMMs with reduced-precision reductions.
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    finish = functools.partial(_finish_initialization, args, denv)
    if getattr(args, "lazy_mpu_init", None):
        return finish
    finish()
    return args


def _finish_initialization(args, denv) -> None:
    """Join torch.distributed (unless joined), build the model-parallel groups (unless built)
    and seed; ``initialize_megatron`` returns it under --lazy-mpu-init."""
    _initialize_distributed(args, denv)
    set_random_seed(args.seed, getattr(args, "data_parallel_random_init", False))


def _setup_logging(args, rank: int) -> None:
    level = getattr(args, "logging_level", None)
    logging.basicConfig(
        level=level if level is not None else logging.INFO,
        format="[%(asctime)s] %(levelname)s %(name)s: %(message)s",
    )
    if rank != 0 and level is None:
        # One rank's informational messages are enough; warnings still come from all.
        logging.getLogger("megatron").setLevel(logging.WARNING)


def _select_backend(args, rank: int) -> str:
    backend = args.distributed_backend
    if backend == "nccl" and not torch.cuda.is_available():
        if rank == 0:
            print("no CUDA device: using the gloo backend on CPU", flush=True)
        return "gloo"
    return backend


def _rendezvous(denv, timeout: timedelta) -> dict:
    """How the ranks find each other: through torchrun's agent store under a prefix of
    this restart attempt (see ``DistributedEnv.attempt_prefix``), else rank 0 hosts a
    store at MASTER_ADDR:MASTER_PORT (slurm, a lone process, launchers without a store)."""
    if denv.agent_store:
        store = dist.TCPStore(denv.master_addr, denv.master_port, denv.world_size, is_master=False,
                              timeout=timeout)
        return {"store": dist.PrefixStore(denv.attempt_prefix(), store)}
    return {"init_method": f"tcp://{denv.master_addr}:{denv.master_port}"}


def _join_fake_world(denv) -> None:
    """--fake-process-group: join torch's fake backend as RANK of WORLD_SIZE (this process is
    the only one); a caller that joined a real group already contradicts the flag."""
    if not dist.is_initialized():
        init_fake_process_group(denv.world_size, denv.rank)
    elif not is_fake():
        raise ValueError(f"--fake-process-group: torch.distributed was already initialized by the caller, with the "
                         f"{dist.get_backend()} backend. Fix: drop the flag, or let initialize_megatron start the "
                         "process group")


def _initialize_distributed(args, denv) -> None:
    """Join the default process group (unless already joined) and build the parallel groups."""
    if torch.cuda.is_available():
        torch.cuda.set_device(denv.local_rank % torch.cuda.device_count())
    if getattr(args, "fake_process_group", False):
        _join_fake_world(denv)
    if not dist.is_initialized():
        backend = _select_backend(args, denv.rank)
        timeout = timedelta(minutes=args.distributed_timeout_minutes)
        kwargs = dict(backend=backend, world_size=denv.world_size, rank=denv.rank, timeout=timeout,
                      **_rendezvous(denv, timeout))
        if backend == "nccl":
            kwargs["device_id"] = torch.device("cuda", torch.cuda.current_device())
        dist.init_process_group(**kwargs)
    if dist.get_world_size() != args.world_size:
        raise RuntimeError(
            f"the process group has {dist.get_world_size()} ranks but the arguments were validated "
            f"for {args.world_size}; launch with torchrun or set WORLD_SIZE consistently"
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=getattr(args, "virtual_pipeline_model_parallel_size", None),
            context_parallel_size=args.context_parallel_size,
            expert_model_parallel_size=args.expert_model_parallel_size,
            expert_tensor_parallel_size=getattr(args, "expert_tensor_parallel_size", None),
            order="tp-cp-ep-pp-dp" if getattr(args, "use_tp_pp_dp_mapping", False) else "tp-cp-ep-dp-pp",
            distributed_timeout_minutes=args.distributed_timeout_minutes,
            num_distributed_optimizer_instances=args.num_distributed_optimizer_instances,
        )
    else:
        # The caller built the model-parallel groups: add the distributed-optimizer
        # instances' groups to them (a no-op when they are there already).
        parallel_state.initialize_distributed_optimizer_instances(args.num_distributed_optimizer_instances,
                                                                  args.distributed_timeout_minutes)
    if denv.restart_count:
        print_rank_0(f"> torchrun restart {denv.restart_count} of at most {denv.max_restarts}: "
                     "resuming from the last committed checkpoint under --load")
    print_rank_0(
        f"> initialized {dist.get_world_size()} rank(s) ({denv.launcher}, {dist.get_backend()}): "
        f"tensor parallel {args.tensor_model_parallel_size}, pipeline parallel "
        f"{args.pipeline_model_parallel_size}, data parallel {args.data_parallel_size}"
    )
    if is_fake():
        logger.warning(rehearsal_notice(parallel_state.get_process_groups()))


def set_random_seed(seed: int, data_parallel_random_init: bool = False) -> None:
    """Seed python, numpy and torch as Megatron does.

    Each pipeline stage gets seed + 100 * pp_rank (stages hold different layers, so they
    need different streams); with --data-parallel-random-init also + 10 * dp_rank. The
    tensor-parallel tracker adds its own offsets per tp rank.
    """
    if seed is None or seed <= 0:
        raise ValueError(f"--seed must be a positive integer, got {seed!r}")
    groups = parallel_state.get_process_groups()
    seed = seed + 100 * groups.rank("pp")
    if data_parallel_random_init:
        seed += 10 * groups.rank("dp")
    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(
        seed,
        tp_rank=groups.rank("tp"),
        ep_rank=groups.rank("ep"),
        etp_rank=groups.rank("expt_tp"),
    )


def shutdown_megatron() -> None:
    """End a script's run: every rank reaches this point, then the parallel groups and the
    default process group are destroyed. Left to interpreter exit, gloo's worker threads
    can be torn down while still joinable, which aborts the process (status 134) after a
    run that otherwise succeeded."""
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
