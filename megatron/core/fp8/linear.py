"""The FP8 linear: y = x W^T with x and W in e4m3, gradients in e5m2 (hybrid) or e4m3.

forward   y = Q(x) Q(W)^T                       (Q: quantize with the slot's scale)
backward  dgrad = Q(dy) Q(W)                     (the FP8 copies saved by the forward)
          wgrad = Q(dy)^T Q(x)                   (or dy^T x in high precision, --no-fp8-wgrad)

Only FP8 copies are kept for the backward (half the bytes of bf16): x^T for the weight
gradient (``torch._scaled_mm`` wants its second operand column-major, so each operand is
quantized straight into the layout its GEMM reads, in the same pass as the row-major copy)
and W^T, which with W itself is quantized once per optimizer step (``weight_cache``).
With --no-fp8-wgrad, x itself is kept. With gradient-accumulation fusion the weight
gradient is added into the fp32 ``weight.main_grad`` and an empty placeholder is returned
(``weight.grad_added_to_main_grad`` set), as the bf16 linears do.

``fp8_column_parallel`` and ``fp8_row_parallel`` wrap it with the tensor-parallel
communication of the two parallel linears. The column layer with a sequence-parallel input
gathers it in FP8: each rank quantizes its own block of the sequence with the scale the
whole sequence gets (amaxes are reduced over the group, so the scale is the same), the FP8
blocks are all-gathered (one byte an element instead of two) and the input gradient is
reduce-scattered back to the blocks. The gathered bytes are the bytes the gathered
high-precision input would quantize to, so the results are the same; under
--no-fp8-wgrad, whose weight gradient needs the gathered input in high precision, the input
is gathered first and quantized after. The row layer's caller reduces the partial products
as in bf16. The ring overlap of ``--tp-comm-overlap`` is not used by the FP8 linears.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron.core.fp8.gemm import fp8_gemm_nt_dequant, select_backend
from megatron.core.fp8.recipe import GRAD_OUTPUT, INPUT, WEIGHT, Fp8Recipe
from megatron.core.fp8.scaling import Fp8Operand, Fp8Scaling
from megatron.core.process_groups import group_size
from megatron.core.tensor_parallel.collectives import all_gather_first_dim, reduce_scatter_first_dim
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.size(-1))


def _fp8_weight(weight: torch.Tensor, scaling: Fp8Scaling, amax_group) -> Fp8Operand:
    """The weight's FP8 copies. Under ``tensorwise`` they depend on the weight alone, so
    they are quantized once per optimizer step (``weight_cache``); under ``delayed`` the
    scale advances with every call, so they are quantized every call. A weight gathered
    in FP8 (--fp8-param-gather) uses the copies the gather put in the cache, or, until
    there is one, its high-precision weight quantized with current scaling."""
    if scaling.weight_gathered_in_fp8:
        return scaling.weight_cache.get(weight, lambda: scaling.quantize_current(weight.detach(), WEIGHT, amax_group))

    def build() -> Fp8Operand:
        return scaling.quantize_operand(weight.detach(), WEIGHT, amax_group, transpose=True)
    if scaling.recipe.recipe != "tensorwise":
        return build()
    return scaling.weight_cache.get(weight, build)


class _Fp8LinearFunction(torch.autograd.Function):
    """x [..., K] @ W[N, K]^T -> [..., N] through FP8 GEMMs; see the module docstring."""

    @staticmethod
    def forward(ctx, x, weight, scaling, backend, amax_group, fuse_accumulation, gather_group):
        """``gather_group``: x is this rank's block [s/tp, ...] of a sequence-parallel input,
        gathered over the group in FP8 (the module docstring); None: x is the whole input."""
        recipe: Fp8Recipe = scaling.recipe
        x2 = _flat(x)
        fp8_wgrad = recipe.wgrad and ctx.needs_input_grad[1]
        if gather_group is None:
            x_op = scaling.quantize_operand(x2, INPUT, amax_group, transpose=fp8_wgrad)
            input_shape = x.shape
        else:
            block = scaling.quantize_operand(x2, INPUT, amax_group, transpose=False)
            q = all_gather_first_dim(block.q.view(torch.uint8), gather_group).view(block.q.dtype)
            x_op = Fp8Operand(q, q.t().contiguous() if fp8_wgrad else None, block.scale, block.scale_inv)
            input_shape = (x.size(0) * group_size(gather_group), *x.shape[1:])
        w = _fp8_weight(weight, scaling, amax_group)
        # x^T in FP8 for the weight gradient; x itself under --no-fp8-wgrad; nothing when
        # no weight gradient is wanted (a frozen weight, evaluation)
        saved_input = x_op.q_t if fp8_wgrad else (x2 if ctx.needs_input_grad[1] else None)
        out = fp8_gemm_nt_dequant(x_op.q, x_op.scale_inv, w.q, w.scale_inv, x.dtype, backend)
        ctx.scaling, ctx.backend, ctx.amax_group = scaling, backend, amax_group
        ctx.fuse_accumulation, ctx.input_shape, ctx.gather_group = fuse_accumulation, input_shape, gather_group
        ctx.weight = weight  # for main_grad; the values come from the FP8 copies
        ctx.save_for_backward(saved_input, x_op.scale_inv, w.q_t, w.scale_inv)
        return out.view(*input_shape[:-1], weight.size(0))

    @staticmethod
    def backward(ctx, grad_output):
        saved_input, x_inv, w_q_t, w_inv = ctx.saved_tensors
        scaling: Fp8Scaling = ctx.scaling
        weight = ctx.weight
        g2 = _flat(grad_output)
        wants_fp8_wgrad = ctx.needs_input_grad[1] and scaling.recipe.wgrad
        g = scaling.quantize_operand(g2, GRAD_OUTPUT, ctx.amax_group, transpose=wants_fp8_wgrad)
        grad_input = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_input = fp8_gemm_nt_dequant(g.q, g.scale_inv, w_q_t, w_inv, grad_output.dtype, ctx.backend)
            grad_input = grad_input.view(ctx.input_shape)
            if ctx.gather_group is not None:
                grad_input = reduce_scatter_first_dim(grad_input, ctx.gather_group)
        if ctx.needs_input_grad[1]:
            main_grad = getattr(weight, "main_grad", None) if ctx.fuse_accumulation else None
            out_dtype = main_grad.dtype if main_grad is not None else weight.dtype
            if wants_fp8_wgrad:
                # saved_input is x^T in FP8 [K, M]: dW = (g^T)(x^T)^T
                grad_weight = fp8_gemm_nt_dequant(g.q_t, g.scale_inv, saved_input, x_inv, out_dtype, ctx.backend)
            else:
                grad_weight = g2.t().matmul(saved_input).to(out_dtype)
            if main_grad is not None:
                main_grad.add_(grad_weight)
                weight.grad_added_to_main_grad = True
                grad_weight = torch.empty_like(weight)
        return grad_input, grad_weight, None, None, None, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scaling: Fp8Scaling, *, amax_group=None,
               fuse_accumulation: bool = False, backend: Optional[str] = None, gather_group=None) -> torch.Tensor:
    """x [..., K] @ weight[N, K]^T in FP8 -> [..., N] in x's dtype. ``amax_group``: the
    group the amaxes are reduced over; ``backend``: default chosen from the weight's device;
    ``gather_group``: x [s/tp, ..., K] is a sequence-parallel block, all-gathered in FP8
    over that group (the output is [s, ..., N], the input gradient reduce-scattered)."""
    if gather_group is not None and not gathers_in_fp8(scaling, weight):
        raise ValueError("fp8_linear(gather_group=...) keeps only FP8 copies of the gathered input, but "
                         "--no-fp8-wgrad computes the weight gradient from the high-precision input: "
                         "gather it first (gather_from_sequence_parallel_region) and pass no gather_group")
    if backend is None:
        backend = select_backend(weight.device, scaling.recipe.emulation)
    return _Fp8LinearFunction.apply(x, weight, scaling, backend, amax_group, fuse_accumulation, gather_group)


def gathers_in_fp8(scaling: Fp8Scaling, weight: torch.Tensor) -> bool:
    """Whether a sequence-parallel input is all-gathered in FP8: always, except under
    --no-fp8-wgrad with a weight gradient to compute (it needs the high-precision input)."""
    return scaling.recipe.wgrad or not weight.requires_grad


def fp8_column_parallel(input_: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        scaling: Fp8Scaling, group, *, sequence_parallel: bool, fuse_accumulation: bool,
                        backend: str, amax_group=None) -> torch.Tensor:
    """The column-parallel linear's output [s, b, out/tp] from [s, b, in] ([s/tp, b, in]
    with ``sequence_parallel``), the GEMM in FP8. Amaxes are reduced over ``amax_group``
    (default ``group``, the tensor-parallel group)."""
    amax_group = group if amax_group is None else amax_group
    if sequence_parallel and group_size(group) > 1 and gathers_in_fp8(scaling, weight):
        output = fp8_linear(input_, weight, scaling, amax_group=amax_group, fuse_accumulation=fuse_accumulation,
                            backend=backend, gather_group=group)
        return output if bias is None else output + bias
    if sequence_parallel:
        total_input = gather_from_sequence_parallel_region(input_, group)
    elif group_size(group) > 1:
        total_input = copy_to_tensor_model_parallel_region(input_, group)
    else:
        total_input = input_
    output = fp8_linear(total_input, weight, scaling, amax_group=amax_group, fuse_accumulation=fuse_accumulation,
                        backend=backend)
    return output if bias is None else output + bias


def fp8_row_parallel(input_: torch.Tensor, weight: torch.Tensor, scaling: Fp8Scaling, group, *,
                     fuse_accumulation: bool, backend: str, amax_group=None) -> torch.Tensor:
    """The row-parallel linear's partial products [s, b, out] from [s, b, in/tp], in FP8
    (the caller reduces them). Amaxes are reduced over ``amax_group`` (default ``group``)."""
    return fp8_linear(input_, weight, scaling, amax_group=group if amax_group is None else amax_group,
                      fuse_accumulation=fuse_accumulation, backend=backend)
