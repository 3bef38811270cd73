"""The matmuls of the tensor-parallel linears, with their communication overlapped.

``ColumnParallelLinear`` and ``RowParallelLinear`` call the two autograd Functions here.
What each overlaps (the serial equivalents are the mappings of ``mappings.py``):

column-parallel, forward
    plain GEMM; with sequence parallelism the input is all-gathered along the sequence
    first, and with ``tp_comm_overlap`` that all-gather is a ring of point-to-point steps,
    each step's GEMM on the chunk in hand running while the next chunk travels.
column-parallel, backward
    the input-gradient GEMM runs while the (sequence-parallel) input is all-gathered again
    for the weight gradient; then the input gradient's all-reduce (or, with sequence
    parallelism, reduce-scatter) runs while the weight-gradient GEMM runs. This is
    Megatron-LM's default behaviour for the tensor-parallel linears.
row-parallel with sequence parallelism and ``tp_comm_overlap``
    forward: the GEMM + reduce-scatter is a ring: each step computes the partial product of
    one sequence chunk while the previous step's partial sum travels to the next rank.
    backward: the output gradient's all-gather is a ring overlapped with the input-gradient
    GEMM of each chunk.
    Without ``tp_comm_overlap`` the row-parallel layer keeps the plain mappings.

Weight-gradient accumulation fusion (``--gradient-accumulation-fusion``, Megatron's default):
when the weight has a ``main_grad`` buffer (the data-parallel wrapper gives every parameter
one), the weight-gradient GEMM adds straight into it (fp32 accumulation of bf16 inputs on
CUDA), skipping the bf16 ``.grad`` and the separate add. The Function then returns an empty
placeholder gradient and sets ``weight.grad_added_to_main_grad`` so the wrapper's hook still
runs (it marks the parameter ready for the overlapped reduction) without adding it again.

Every collective reads and writes dim-0 blocks, so a sequence-first activation [s, b, h]
is chunked along the sequence. With a gloo group the collectives run synchronously (CPU
runs: correctness only); the ring steps use send/recv, which gloo supports.
"""

from __future__ import annotations

import logging
from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron.core.fake_backend import receive_buffer
from megatron.core.process_groups import group_rank, group_size
from megatron.core.tensor_parallel.collectives import all_gather_first_dim_async, reduce_scatter_first_dim_async

logger = logging.getLogger(__name__)

_FP32_ACCUMULATE_OK: Optional[bool] = None  # whether this torch's CUDA addmm takes out_dtype


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.size(-1))


def _add_weight_grad_into(main_grad: torch.Tensor, grad_2d: torch.Tensor, input_2d: torch.Tensor) -> None:
    """main_grad += grad_2d^T @ input_2d, in main_grad's precision."""
    global _FP32_ACCUMULATE_OK
    a, b = grad_2d.t(), input_2d
    if main_grad.device.type != "cuda":
        # CPU: the same bits as autograd's grad followed by the wrapper's add
        main_grad.add_(a.matmul(b))
        return
    if main_grad.dtype == a.dtype:
        main_grad.addmm_(a, b)
        return
    if _FP32_ACCUMULATE_OK is not False:
        try:
            torch.addmm(main_grad, a, b, out_dtype=main_grad.dtype, out=main_grad)
            if _FP32_ACCUMULATE_OK is None:
                _FP32_ACCUMULATE_OK = True
                logger.info("gradient accumulation fusion: weight gradients accumulate in %s inside the GEMM",
                            main_grad.dtype)
            return
        except (RuntimeError, TypeError) as err:
            _FP32_ACCUMULATE_OK = False
            logger.warning("gradient accumulation fusion: this torch cannot write a %s GEMM into a %s buffer "
                           "(%s); adding the weight gradient separately", a.dtype, main_grad.dtype, err)
    main_grad.add_(a.matmul(b).to(main_grad.dtype))


def weight_gradient(weight: torch.Tensor, grad_2d: torch.Tensor, input_2d: torch.Tensor,
                    fuse_accumulation: bool) -> torch.Tensor:
    """The weight's gradient for autograd: computed, or added into ``weight.main_grad``
    (then an uninitialised placeholder is returned; see the module docstring)."""
    main_grad = getattr(weight, "main_grad", None) if fuse_accumulation else None
    if main_grad is None:
        return grad_2d.t().matmul(input_2d)
    _add_weight_grad_into(main_grad, grad_2d, input_2d)
    weight.grad_added_to_main_grad = True
    return torch.empty_like(weight)


def _wait(work) -> None:
    if work is not None:
        work.wait()


# ---------------------------------------------------------------------------------------------
# Ring decompositions (tp_comm_overlap)
# ---------------------------------------------------------------------------------------------


def _ring_peers(group) -> Tuple[int, int, int, int]:
    """(world, rank, global rank of the next rank, global rank of the previous one)."""
    world, rank = group_size(group), group_rank(group)
    return (world, rank, dist.get_global_rank(group, (rank + 1) % world),
            dist.get_global_rank(group, (rank - 1) % world))


def _exchange(send: torch.Tensor, recv: torch.Tensor, next_rank: int, prev_rank: int, group) -> List:
    ops = [dist.P2POp(dist.isend, send, next_rank, group), dist.P2POp(dist.irecv, recv, prev_rank, group)]
    return dist.batch_isend_irecv(ops)


def ring_all_gather_matmul(shard: torch.Tensor, matmul: Callable[[torch.Tensor, torch.Tensor], None],
                           out_last_dim: int, group) -> Tuple[torch.Tensor, torch.Tensor]:
    """All-gather ``shard`` [n, ...] along dim 0 and apply ``matmul`` to every block,
    each block's matmul running while the next block travels around the ring.

    ``matmul(block, out)`` writes the result of one [n, ...] block into ``out`` [n, ..., out_last_dim].
    Returns (the results for the whole [world*n, ...] input, the gathered input).
    """
    world, rank, next_rank, prev_rank = _ring_peers(group)
    n = shard.size(0)
    gathered = receive_buffer((world * n,) + tuple(shard.shape[1:]), shard.dtype, shard.device, group)
    out = torch.empty((world * n,) + tuple(shard.shape[1:-1]) + (out_last_dim,), dtype=shard.dtype,
                      device=shard.device)
    gathered[rank * n:(rank + 1) * n].copy_(shard)
    held = rank
    for step in range(world):
        incoming = (held - 1) % world
        reqs = []
        if step < world - 1:  # pass the block in hand on, take the previous rank's
            reqs = _exchange(gathered[held * n:(held + 1) * n], gathered[incoming * n:(incoming + 1) * n],
                             next_rank, prev_rank, group)
        matmul(gathered[held * n:(held + 1) * n], out[held * n:(held + 1) * n])
        for req in reqs:
            req.wait()
        held = incoming
    return out, gathered


def ring_matmul_reduce_scatter(full: torch.Tensor, matmul: Callable[[torch.Tensor], torch.Tensor],
                               group) -> torch.Tensor:
    """Reduce-scatter along dim 0 of ``matmul`` applied to ``full`` [world*n, ...]: this
    rank gets the sum over ranks of ``matmul(block r)`` where r is its own rank. Each step
    computes one block's partial product while the previous partial sum travels on."""
    world, rank, next_rank, prev_rank = _ring_peers(group)
    if full.size(0) % world:
        raise ValueError(
            f"--tp-comm-overlap splits the sequence into {world} blocks: the first dimension "
            f"{full.size(0)} is not divisible by --tensor-model-parallel-size {world}"
        )
    n = full.size(0) // world
    reqs, received = [], None
    for step in range(world):
        block = (rank - step - 1) % world  # the last step computes this rank's own block
        partial = matmul(full[block * n:(block + 1) * n])
        for req in reqs:
            req.wait()
        if received is not None:
            partial += received
        if step == world - 1:
            return partial
        received = receive_buffer(partial.shape, partial.dtype, partial.device, group)
        reqs = _exchange(partial, received, next_rank, prev_rank, group)
    raise AssertionError("unreachable")


def _matmul_into(weight_t: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], None]:
    def matmul(block: torch.Tensor, out: torch.Tensor) -> None:
        torch.matmul(block, weight_t, out=out)

    return matmul


# ---------------------------------------------------------------------------------------------
# Column-parallel
# ---------------------------------------------------------------------------------------------


class _ColumnParallelMatmul(torch.autograd.Function):
    """y = x W^T + b for a column-parallel weight; see the module docstring."""

    @staticmethod
    def forward(ctx, input_, weight, bias, group, sequence_parallel, ring, fuse_accumulation):
        ctx.group, ctx.sequence_parallel, ctx.fuse_accumulation = group, sequence_parallel, fuse_accumulation
        ctx.has_bias = bias is not None
        ctx.save_for_backward(input_, weight)
        if sequence_parallel and ring:
            output, _ = ring_all_gather_matmul(input_, _matmul_into(weight.t()), weight.size(0), group)
            return output if bias is None else output.add_(bias)
        if sequence_parallel:
            total_input, work = all_gather_first_dim_async(input_, group)
            _wait(work)
        else:
            total_input = input_
        return torch.nn.functional.linear(total_input, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        input_, weight = ctx.saved_tensors
        group = ctx.group
        grad_output = grad_output.contiguous()
        total_input, gather_work = input_, None
        if ctx.sequence_parallel and ctx.needs_input_grad[1]:
            total_input, gather_work = all_gather_first_dim_async(input_, group)  # runs during dgrad
        grad_input = reduce_work = None
        if ctx.needs_input_grad[0]:
            grad_input = grad_output.matmul(weight)
            if ctx.sequence_parallel:
                grad_input, reduce_work = reduce_scatter_first_dim_async(grad_input, group)
            elif group_size(group) > 1:
                reduce_work = dist.all_reduce(grad_input, group=group, async_op=True)
        _wait(gather_work)
        grad_2d = _flat(grad_output)
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[1]:  # runs while the input gradient is being reduced
            grad_weight = weight_gradient(weight, grad_2d, _flat(total_input), ctx.fuse_accumulation)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_2d.sum(dim=0)
        _wait(reduce_work)
        return grad_input, grad_weight, grad_bias, None, None, None, None


def column_parallel_matmul(input_: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], group, *,
                           sequence_parallel: bool, tp_comm_overlap: bool,
                           fuse_accumulation: bool) -> torch.Tensor:
    """The column-parallel layer's output [s, b, out/tp] from input [s, b, in]
    ([s/tp, b, in] with ``sequence_parallel``)."""
    parallel = group_size(group) > 1
    return _ColumnParallelMatmul.apply(input_, weight, bias, group if parallel else None,
                                       sequence_parallel and parallel, tp_comm_overlap, fuse_accumulation)


# ---------------------------------------------------------------------------------------------
# Row-parallel (the matmul; the reduction is the caller's unless the ring does it)
# ---------------------------------------------------------------------------------------------


class _RowParallelMatmul(torch.autograd.Function):
    """x W^T for a row-parallel weight; with ``ring``, reduce-scattered along the sequence
    by the ring (and the backward all-gathers the output gradient by the ring)."""

    @staticmethod
    def forward(ctx, input_, weight, group, ring, fuse_accumulation):
        ctx.group, ctx.ring, ctx.fuse_accumulation = group, ring, fuse_accumulation
        ctx.save_for_backward(input_, weight)
        if ring:
            weight_t = weight.t()
            return ring_matmul_reduce_scatter(input_, lambda block: block.matmul(weight_t), group)
        return torch.nn.functional.linear(input_, weight)

    @staticmethod
    def backward(ctx, grad_output):
        input_, weight = ctx.saved_tensors
        grad_output = grad_output.contiguous()
        grad_input = grad_weight = None
        if ctx.ring:
            grad_input, grad_output = ring_all_gather_matmul(grad_output, _matmul_into(weight), weight.size(1),
                                                             ctx.group)
        elif ctx.needs_input_grad[0]:
            grad_input = grad_output.matmul(weight)
        if ctx.needs_input_grad[1]:
            grad_weight = weight_gradient(weight, _flat(grad_output), _flat(input_), ctx.fuse_accumulation)
        return grad_input, grad_weight, None, None, None


def row_parallel_matmul(input_: torch.Tensor, weight: torch.Tensor, group, *, reduce_scatter_by_ring: bool,
                        fuse_accumulation: bool) -> torch.Tensor:
    """input [s, b, in/tp] @ W^T: the partial products [s, b, out], or with
    ``reduce_scatter_by_ring`` their sequence-parallel sum [s/tp, b, out]."""
    ring = reduce_scatter_by_ring and group_size(group) > 1
    return _RowParallelMatmul.apply(input_, weight, group if ring else None, ring, fuse_accumulation)
