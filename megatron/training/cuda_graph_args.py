"""``--cuda-graph-impl full_iteration``: which runs it serves, and the graphed schedule.

The capture itself is ``megatron.core.full_cuda_graph``. A replayed graph runs no Python, so
the features whose step keeps state on the host, or talks to other model-parallel ranks
inside the forward-backward, are refused here with the flag to drop rather than captured
wrongly.
"""

from __future__ import annotations

import argparse
import logging
from typing import Callable, Optional

import torch

from megatron.core.full_cuda_graph import CudaGraphCaptureError, FullIterationCudaGraph
from megatron.core.pipeline_parallel.schedules import get_forward_backward_func
from megatron.training.user_errors import UserError

logger = logging.getLogger(__name__)

_FIX = "drop --cuda-graph-impl (the step then runs eagerly)"


def full_iteration_graph(args: argparse.Namespace) -> bool:
    """Whether the command line asks for the whole forward-backward as one CUDA graph."""
    scope = args.cuda_graph_scope or []
    return args.cuda_graph_impl == "full_iteration" or (
        args.cuda_graph_impl == "local" and "full_iteration" in scope)


def check_cuda_graphs(args: argparse.Namespace) -> None:
    """Refuse what the graph cannot replay; raises ValueError naming the flag."""
    from megatron.training.argument_checks import invalid

    if full_iteration_graph(args) and args.cuda_graph_warmup_steps < 1:
        raise invalid("--cuda-graph-warmup-steps", args.cuda_graph_warmup_steps,
                      "the capture needs at least one eager step first (it compiles kernels and sets up the GPU "
                      "libraries, which cannot happen inside a capture)", "use 1 or more (Megatron's default is 3)")
    if args.cuda_graph_scope and args.cuda_graph_impl == "none" and args.rank == 0:
        logger.warning("--cuda-graph-scope %s has no effect without --cuda-graph-impl: the step runs eagerly",
                       " ".join(args.cuda_graph_scope))
    if args.cuda_graph_impl in ("local", "transformer_engine") and not full_iteration_graph(args):
        raise invalid("--cuda-graph-impl", args.cuda_graph_impl, "per-layer CUDA graphs are not built here",
                      "use --cuda-graph-impl full_iteration (the whole forward-backward as one graph)")
    if not full_iteration_graph(args):
        return
    extra_scopes = [s for s in (args.cuda_graph_scope or []) if s != "full_iteration"]
    if extra_scopes:
        raise invalid("--cuda-graph-scope", " ".join(args.cuda_graph_scope),
                      "the whole forward-backward is captured; per-layer scopes do not combine with it",
                      "give --cuda-graph-scope full_iteration or drop it")
    for flag, value, given in (
        ("--tensor-model-parallel-size", args.tensor_model_parallel_size, args.tensor_model_parallel_size > 1),
        ("--pipeline-model-parallel-size", args.pipeline_model_parallel_size, args.pipeline_model_parallel_size > 1),
        ("--context-parallel-size", args.context_parallel_size, args.context_parallel_size > 1),
        ("--expert-model-parallel-size", args.expert_model_parallel_size, args.expert_model_parallel_size > 1),
    ):
        if given:
            raise invalid(flag, value, "--cuda-graph-impl full_iteration is built for one model-parallel rank "
                          "(data parallelism works; its reduction runs after the replay)", f"use 1 or {_FIX}")
    if args.num_experts:
        _check_moe_capture(args)
    for flag, value, given in (
        ("--mtp-num-layers", args.mtp_num_layers, bool(args.mtp_num_layers)),
        ("--recompute-granularity", args.recompute_granularity, args.recompute_granularity is not None),
        ("--recompute-activations", True, args.recompute_activations),
        ("--use-torch-fsdp2", True, args.use_torch_fsdp2),
    ):
        if given:
            raise invalid(flag, value, "is not captured by --cuda-graph-impl full_iteration (its step keeps "
                          "state on the host)", f"drop {flag} or {_FIX}")


def _check_moe_capture(args: argparse.Namespace) -> None:
    """MoE layers are captured where their dispatch never asks the GPU for a size (one
    rank: expert parallelism is refused above): grouped GEMMs with dropless routing or
    every expert padded to its capacity (docs/moe.md, "dispatch without host
    synchronization")."""
    from megatron.training.argument_checks import invalid

    why = "is not captured by --cuda-graph-impl full_iteration with --num-experts"
    if not args.moe_grouped_gemm:
        raise invalid("--moe-grouped-gemm", False, "the per-expert loop splits its input by token counts read on "
                      "the host, which a graph replay cannot do", f"add --moe-grouped-gemm or {_FIX}")
    if args.moe_expert_capacity_factor is not None and not args.moe_pad_expert_input_to_capacity:
        raise invalid("--moe-expert-capacity-factor", args.moe_expert_capacity_factor, "token dropping without "
                      "padding asks the GPU how many tokens were kept", "add --moe-pad-expert-input-to-capacity, "
                      f"drop the capacity factor (dropless routing) or {_FIX}")
    if args.moe_router_load_balancing_type == "sinkhorn":
        raise invalid("--moe-router-load-balancing-type", "sinkhorn", f"{why} (its iterations stop on a "
                      "tolerance read on the host)", f"use aux_loss, seq_aux_loss or none, or {_FIX}")


def graphed_forward_backward(args: argparse.Namespace, pg) -> Optional[Callable]:
    """The graphed schedule for the training loop, or None to run the layout's schedule eagerly."""
    if not full_iteration_graph(args):
        return None
    if not torch.cuda.is_available():
        raise UserError(f"--cuda-graph-impl full_iteration needs a CUDA GPU; fix: {_FIX} on CPU")
    try:
        graphed = FullIterationCudaGraph(get_forward_backward_func(pg, vp_size=1), args.cuda_graph_warmup_steps)
    except ValueError as err:
        raise UserError(str(err)) from err
    return as_user_errors(graphed)


def as_user_errors(graphed: Callable) -> Callable:
    """``graphed`` with its refusals (a micro-batch of another shape, a step that cannot be
    captured) reported as user errors: one message, no traceback."""

    def forward_backward(**kwargs):
        try:
            return graphed(**kwargs)
        except (ValueError, CudaGraphCaptureError) as err:
            raise UserError(str(err)) from err

    return forward_backward
