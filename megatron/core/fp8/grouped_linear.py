"""The FP8 grouped linear of the MoE experts: group g's rows of x times W[g]^T, for all
local experts at once, with the GEMMs of ``linear`` (forward, dgrad, wgrad) per expert.

forward   y_g = Q_g(x_g) Q_g(W_g)^T
backward  dx_g = Q_g(dy_g) Q_g(W_g),   dW_g = Q_g(dy_g)^T Q_g(x_g)   (dy_g^T x_g with --no-fp8-wgrad)

Q_g quantizes with expert g's own scale: every expert keeps its own ``Fp8Scaling`` per
linear (the one its ``linear_fc1`` / ``linear_fc2`` holds, as in the one-expert-at-a-time
loop, under the same checkpoint keys), as Transformer Engine's GroupedLinear keeps FP8
metadata per GEMM. One scale shared by all experts would be set by the busiest expert's
largest value: the tokens of an expert with smaller activations, and its weight, would
use a fraction of the FP8 range, losing precision for no reason, and an expert's state
would depend on which other experts share its rank (the expert-parallel layout).

The states are stacked [G, ...] for each quantization (``advance_scales`` on all experts
at once, the same rule as one linear's) and written back; the amaxes are per expert
(``group_amax``, no host synchronization) and reduced over the expert tensor-parallel
group. The GEMMs are ``grouped_gemm``'s. An expert without tokens records amax 0 (under
``delayed`` its scale stays), as the one-expert loop does.
"""

from __future__ import annotations

from typing import List, NamedTuple, Sequence

import torch

from megatron.core.fp8 import recompute_replay
from megatron.core.fp8.gemm import EMULATION
from megatron.core.fp8.grouped_gemm import (
    GroupedRows,
    from_layout,
    grouped_nt,
    grouped_tn,
    grouped_tn_high_precision,
    row_layout,
    to_layout,
)
from megatron.core.fp8.recipe import GRAD_OUTPUT, INPUT, WEIGHT
from megatron.core.fp8.scaling import Fp8Scaling, advance_scales, fp8_max, group_amax, quantize, reduce_amax


class GroupedFp8Operand(NamedTuple):
    """A grouped operand in FP8: ``q`` and one dequantization factor per group [G]."""

    q: torch.Tensor
    scale_inv: torch.Tensor


class GroupedScaling:
    """The per-expert ``Fp8Scaling`` states of one grouped linear, used stacked."""

    def __init__(self, states: Sequence[Fp8Scaling], amax_group=None) -> None:
        self.states: List[Fp8Scaling] = list(states)
        self.recipe = self.states[0].recipe
        self.amax_group = amax_group

    @torch.no_grad()
    def scales_for(self, amax: torch.Tensor, slot: int) -> torch.Tensor:
        """The scales [G] to quantize with for ``slot``, each expert's state advanced with
        its ``amax`` [G] (reduced over the amax group first); in the recompute of a
        checkpointed forward under ``delayed``, the scales the first forward used, the
        states left alone (``recompute_replay``)."""
        forward_delayed = self.recipe.recipe == "delayed" and slot != GRAD_OUTPUT
        replay = recompute_replay.replaying_now() if forward_delayed else None
        if replay is not None:
            return replay.take(self.states[0], slot)
        record = recompute_replay.recording_now() if forward_delayed else None
        used = self._advance(amax, slot)
        if record is not None:
            record.note(self.states[0], slot, used)
        return used

    def _advance(self, amax: torch.Tensor, slot: int) -> torch.Tensor:
        amax = reduce_amax(amax, self.amax_group)
        history = torch.stack([s.amax_history for s in self.states])  # [G, L, slots]
        scale = torch.stack([s.scale for s in self.states])  # [G, slots]
        used = advance_scales(history[:, :, slot].t(), scale[:, slot], amax, self.recipe,
                              fp8_max(self.recipe.dtype(slot)))
        torch._foreach_copy_([s.amax_history for s in self.states], list(history.unbind(0)))
        torch._foreach_copy_([s.scale for s in self.states], list(scale.unbind(0)))
        return used

    @torch.no_grad()
    def quantize_rows(self, x: torch.Tensor, slot: int, rows: GroupedRows) -> GroupedFp8Operand:
        """x [N, K] (rows grouped as ``rows`` says) quantized with each row's expert scale,
        placed in the GEMM layout."""
        scale = self.scales_for(group_amax(x, rows.row_group, rows.num_groups), slot)
        q = quantize(x, scale.index_select(0, rows.row_group)[:, None], self.recipe.dtype(slot))
        return GroupedFp8Operand(to_layout(q, rows), scale.reciprocal())

    @torch.no_grad()
    def quantize_weights(self, weights: torch.Tensor) -> GroupedFp8Operand:
        """weights [G, N, K] quantized with each expert's weight scale. Weights gathered in
        FP8 (--fp8-param-gather) use the gathered copies when every expert has a current
        one, else current scaling of ``weights``."""
        gathered = [s.weight_cache.current() for s in self.states] if self.states[0].weight_gathered_in_fp8 else []
        if gathered and all(op is not None for op in gathered):
            return GroupedFp8Operand(torch.stack([op.q for op in gathered]),
                                     torch.stack([op.scale_inv for op in gathered]))
        amax = weights.detach().abs().amax(dim=(1, 2)).float() if weights.numel() else \
            weights.new_zeros(weights.size(0), dtype=torch.float32)
        if gathered:
            amax = reduce_amax(amax, self.amax_group)
            scale = torch.stack([s.record_current_scale(a, WEIGHT) for s, a in zip(self.states, amax)])
        else:
            scale = self.scales_for(amax, WEIGHT)
        return GroupedFp8Operand(quantize(weights, scale[:, None, None], self.recipe.forward_dtype),
                                 scale.reciprocal())


class _Fp8GroupedLinearFunction(torch.autograd.Function):
    """x [N, K] grouped by expert, weights [G, N_out, K] -> [N, N_out]; see the module docstring."""

    @staticmethod
    def forward(ctx, x, weights, scaling: GroupedScaling, rows: GroupedRows, backend: str):
        fp8_wgrad = scaling.recipe.wgrad and ctx.needs_input_grad[1]
        x_op = scaling.quantize_rows(x, INPUT, rows)
        w_op = scaling.quantize_weights(weights)
        out = from_layout(grouped_nt(x_op.q, x_op.scale_inv, w_op.q, w_op.scale_inv, rows, x.dtype, backend), rows)
        # x^T in FP8 for the weight gradient (the layout its GEMM reads); x itself under
        # --no-fp8-wgrad; nothing when no weight gradient is wanted
        if fp8_wgrad:
            saved_input = x_op.q.t().contiguous()
        else:
            saved_input = to_layout(x.detach(), rows) if ctx.needs_input_grad[1] else None
        ctx.scaling, ctx.rows, ctx.backend, ctx.weight_dtype = scaling, rows, backend, weights.dtype
        ctx.save_for_backward(saved_input, x_op.scale_inv, w_op.q.transpose(1, 2).contiguous(), w_op.scale_inv)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        saved_input, x_inv, w_q_t, w_inv = ctx.saved_tensors
        scaling: GroupedScaling = ctx.scaling
        rows, backend = ctx.rows, ctx.backend
        grad_output = grad_output.contiguous()
        g = scaling.quantize_rows(grad_output, GRAD_OUTPUT, rows)
        grad_input = grad_weights = None
        if ctx.needs_input_grad[0]:
            grad_input = from_layout(grouped_nt(g.q, g.scale_inv, w_q_t, w_inv, rows, grad_output.dtype, backend),
                                     rows)
        if ctx.needs_input_grad[1]:
            if scaling.recipe.wgrad:
                grad_weights = grouped_tn(g.q.t().contiguous(), g.scale_inv, saved_input, x_inv, rows,
                                          ctx.weight_dtype, backend)
            else:
                grad_weights = grouped_tn_high_precision(to_layout(grad_output, rows), saved_input, rows,
                                                         ctx.weight_dtype, backend)
        return grad_input, grad_weights, None, None, None


def fp8_grouped_linear(x: torch.Tensor, weights: torch.Tensor, states: Sequence[Fp8Scaling],
                       counts: torch.Tensor, *, amax_group, backend: str) -> torch.Tensor:
    """x [N, K] (rows grouped by expert, ``counts`` [G] int64 rows each, on x's device)
    times each expert's weights[g] [N_out, K]^T in FP8 -> [N, N_out] in x's dtype.
    ``states``: the experts' ``Fp8Scaling`` of this linear, in expert order; ``amax_group``:
    the expert tensor-parallel group; ``backend``: ``gemm.select_backend``'s choice. The
    rows are padded to 16 per expert for the GPU kernels, not for the emulation (whose
    results then equal the one-expert-at-a-time FP8 linear's exactly)."""
    rows = row_layout(counts, x.size(0), padded=backend != EMULATION)
    return _Fp8GroupedLinearFunction.apply(x, weights, GroupedScaling(states, amax_group), rows, backend)
