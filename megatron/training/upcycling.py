"""``--moe-use-upcycling``: start an MoE run from a dense checkpoint, as Megatron-LM does.

The first run of an upcycled model passes the MoE flags (``--num-experts``, the router's)
together with ``--moe-use-upcycling``, ``--load`` naming the dense checkpoint and an empty
``--save``. At start-up this builds the dense model the checkpoint holds (the same flags
without experts, with an FFN of ``--ffn-hidden-size`` x ``--moe-upcycling-granularity``),
loads it, turns its weights into the MoE model's (``megatron.core.transformer.moe.upcycling``),
saves the MoE model as iteration 1 under ``--save`` and trains on from there. Later runs
drop ``--moe-use-upcycling`` and resume from ``--save`` as usual. The optimizer starts
fresh; the data position and the FLOPs so far are the dense checkpoint's (``--finetune``
starts them at zero), as in Megatron.
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Callable, Dict, List, Sequence

from megatron.core.process_groups import ProcessGroups
from megatron.core.transformer.moe.upcycling import UpcyclingShape, check_shape, upcycle_state_dict
from megatron.training.checkpointing import directory as layout
from megatron.training.checkpointing import load_checkpoint, save_checkpoint
from megatron.training.rank_print import print_rank_0
from megatron.training.run_state import RunState

FLAG = "--moe-use-upcycling"


def check_upcycling_args(args: argparse.Namespace) -> None:
    """The flag combinations upcycling needs, checked with the other flags at start-up."""
    from megatron.training.argument_checks import invalid

    if args.moe_upcycling_granularity < 1:
        raise invalid("--moe-upcycling-granularity", args.moe_upcycling_granularity, "must be >= 1",
                      "use 1 (each expert a copy of the dense MLP) or how many experts share one dense MLP")
    if not args.moe_use_upcycling:
        return
    if not args.num_experts:
        raise invalid(FLAG, True, "makes the experts of an MoE model", "add --num-experts N")
    if not args.load:
        raise invalid(FLAG, True, "reads the dense checkpoint named by --load", "add --load DENSE_CHECKPOINT_DIR")
    if not args.save:
        raise invalid(FLAG, True, "saves the upcycled MoE model under --save (the next runs resume from there)",
                      "add --save DIR (and --save-interval N)")
    if args.use_torch_fsdp2:
        raise invalid(FLAG, True, "builds the MoE weights from whole per-rank tensors, which FSDP2 shards",
                      "run the upcycling step without --use-torch-fsdp2 (later runs may use it: the checkpoint "
                      "reshards on load)")
    if args.moe_shared_expert_intermediate_size:
        raise invalid(FLAG, True, "copies the dense MLP into the routed experts; a shared expert would start "
                      "from random weights", "drop --moe-shared-expert-intermediate-size")
    etp = args.expert_tensor_parallel_size or args.tensor_model_parallel_size
    if etp != args.tensor_model_parallel_size:
        raise invalid("--expert-tensor-parallel-size", etp, f"upcycling cuts each rank's shard of the dense MLP, "
                      f"which needs the experts split as the dense MLP is (--tensor-model-parallel-size "
                      f"{args.tensor_model_parallel_size})", "drop --expert-tensor-parallel-size for the upcycling run")
    if args.moe_upcycling_granularity > 1 and args.tensor_model_parallel_size > 1:
        raise invalid("--moe-upcycling-granularity", args.moe_upcycling_granularity, "with tensor parallelism the "
                      "FFN pieces would depend on --tensor-model-parallel-size", "run the upcycling step with "
                      "--tensor-model-parallel-size 1 (later runs reshard its checkpoint on load)")


def upcycling_shape(args: argparse.Namespace) -> UpcyclingShape:
    shape = UpcyclingShape(num_experts=args.num_experts, topk=args.moe_router_topk,
                           granularity=args.moe_upcycling_granularity, pre_softmax=args.moe_router_pre_softmax,
                           gated=bool(args.swiglu or args.quick_geglu), squared_relu=bool(args.squared_relu))
    check_shape(shape, args.ffn_hidden_size * shape.granularity, args.moe_ffn_hidden_size)
    return shape


@contextlib.contextmanager
def dense_model_args(args: argparse.Namespace):
    """``args`` as the dense checkpoint's model: no experts, the dense FFN width."""
    saved = (args.num_experts, args.expert_model_parallel_size, args.ffn_hidden_size)
    args.num_experts, args.expert_model_parallel_size = None, 1
    args.ffn_hidden_size = args.ffn_hidden_size * args.moe_upcycling_granularity
    try:
        yield args
    finally:
        args.num_experts, args.expert_model_parallel_size, args.ffn_hidden_size = saved


def _unwrapped(chunk):
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def moe_layer_experts(chunk) -> Dict[str, Sequence[int]]:
    """{state-dict prefix of each MoE layer: the global indices of its local experts}."""
    out = {}
    for name, module in _unwrapped(chunk).named_modules():
        indices = getattr(module, "local_expert_indices", None)
        if indices is not None and name.endswith(".mlp"):
            out[name[: -len("mlp")]] = list(indices)
    return out


def upcycle(model: List, optimizer, scheduler, model_provider_func: Callable, pg_collection: ProcessGroups,
            args: argparse.Namespace, state: RunState, get_model: Callable) -> None:
    """Load the dense checkpoint, make the MoE weights, save them as iteration 1 (collective)."""
    existing = layout.committed_iterations(args.save)
    if existing:
        raise ValueError(f"{FLAG}: --save {args.save} already holds checkpoints (iterations {existing[-3:]}); "
                         f"upcycling is the first run of the MoE model only. Fix: resume with --load {args.save} "
                         f"and without {FLAG}, or choose an empty --save directory")
    shape = upcycling_shape(args)
    with dense_model_args(args):
        dense = get_model(model_provider_func, pg_collection, wrap_with_ddp=False)
        load_checkpoint(dense, None, None, args, pg_collection, run_state=state)
    chunks = [_unwrapped(c) for c in model]
    if len(chunks) != len(dense):
        raise ValueError(f"{FLAG}: the MoE model has {len(chunks)} chunks but the dense one {len(dense)}")
    for moe_chunk, dense_chunk in zip(chunks, dense):
        moe_state = moe_chunk.state_dict()
        dense_state = dense_chunk.state_dict()
        for key in dense_state.keys() & moe_state.keys():
            if dense_state[key].shape != moe_state[key].shape:
                raise ValueError(f"{FLAG}: {key} is {tuple(dense_state[key].shape)} in the dense model but "
                                 f"{tuple(moe_state[key].shape)} in the MoE model; only the MLPs that become "
                                 "experts may differ (with --moe-upcycling-granularity > 1, make every layer an "
                                 "MoE layer: drop --moe-layer-freq)")
        moe_chunk.load_state_dict(upcycle_state_dict(dense_state, moe_state, shape, moe_layer_experts(moe_chunk)))
    del dense
    if optimizer is not None:
        optimizer.reload_model_params()
    state.iteration = 1
    save_checkpoint(1, model, optimizer, scheduler, state.floating_point_operations_so_far, args, pg_collection,
                    run_state=state)
    print_rank_0(f"upcycled the dense checkpoint {args.load} into {args.num_experts} experts per MoE layer "
                 f"(granularity {shape.granularity}, weight scale {shape.weight_scale():.4f}); saved as iteration 1 "
                 f"under {args.save}. Resume later runs with --load {args.save} and without {FLAG}")
