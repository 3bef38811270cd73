"""Routed experts of one MoE layer: this rank's local experts, as a loop or a grouped GEMM.

Each expert is an MLP (fc1 -> activation -> fc2, fc1 = [gate; up] with --swiglu) whose
weights are split over the expert tensor-parallel group (fc1 by rows, fc2 by columns),
so its output on one rank is a partial sum that the token dispatcher adds up. Weights
live in ``local_experts.{i}.linear_fc{1,2}.weight`` (Megatron's SequentialMLP names) for
both paths, so checkpoints do not depend on --moe-grouped-gemm.

In a layer that runs in FP8 (``fp8.layer_scope``) each expert's fc1 and fc2 hold their
own FP8 scaling state (``local_experts.{i}.linear_fc{1,2}.fp8``, for both paths too): the
loop runs each expert through the FP8 linear, the grouped path through the FP8 grouped
linear (``fp8.grouped_linear``), which gives the loop's results exactly in the emulation.

With --use-cpu-initialization inside ``layout_independent_initialization`` the full
weights of global expert g of layer L are drawn from a generator seeded by
(seed, "layer{L}/expert{g}"), so every expert-parallel layout builds the same model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from megatron.core import tensor_parallel
from megatron.core.process_groups import group_size
from megatron.core.fp8.gemm import SCALED_MM, select_backend
from megatron.core.fp8.grouped_gemm import ROW_ALIGN as _FP8_ROW_ALIGN
from megatron.core.fp8.grouped_linear import fp8_grouped_linear
from megatron.core.fp8.linear import fp8_linear
from megatron.core.fusions.fused_bias_activation import bias_activation
from megatron.core.transformer.init_rng import initialization_stream
from megatron.core.transformer.activations import openai_gelu
from megatron.core.transformer.moe import expert_weights
from megatron.core.transformer.moe.grouped_wgrad import accumulates_in_gemm, grouped_linear_accumulating
from megatron.core.transformer.moe.token_permutation import gather_rows, scatter_rows

logger = logging.getLogger(__name__)


def _activation(config):
    if config.openai_gelu and config.activation_func is F.gelu:
        return openai_gelu
    return config.activation_func


class ExpertMLP(torch.nn.Module):
    """One expert: ``forward(x [n, h]) -> [n, h]`` (a partial sum over expert-TP shards;
    no communication here). fc2's bias is added (ETP 1 only, checked by the config)."""

    def __init__(self, config, expt_tp_group):
        super().__init__()
        ffn = config.moe_ffn_hidden_size
        self.gated = config.gated_linear_unit
        self.activation_func = _activation(config)
        self.bias_activation_fusion = config.bias_activation_fusion
        self.clamp_value = config.activation_func_clamp_value
        self.linear_offset = config.glu_linear_offset
        self.linear_fc1 = tensor_parallel.ColumnParallelLinear(
            config.hidden_size, 2 * ffn if self.gated else ffn, config=config, init_method=config.init_method,
            bias=config.add_bias_linear, gather_output=False, skip_bias_add=True,
            stride=2 if self.gated else 1, is_expert=True, tp_group=expt_tp_group,
        )
        self.linear_fc2 = tensor_parallel.RowParallelLinear(
            ffn, config.hidden_size, config=config, init_method=config.output_layer_init_method,
            bias=config.add_bias_linear, input_is_parallel=True, skip_bias_add=True, is_expert=True,
            tp_group=expt_tp_group,
        )
        for param in self.parameters():
            # Expert grads are reduced over the expert data-parallel group only.
            param.allreduce = False

    def activate(self, intermediate: torch.Tensor) -> torch.Tensor:
        """fc1 output (bias added) -> the input of fc2; shared with GroupedMLP."""
        return bias_activation(
            intermediate, None, self.activation_func, self.gated, self.bias_activation_fusion,
            self.clamp_value, self.linear_offset,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        intermediate = self.activate(_expert_linear(x, self.linear_fc1))
        return _expert_linear(intermediate, self.linear_fc2)


def expert_amax_group(linear, config):
    """The group an expert linear reduces its FP8 amaxes over: its expert tensor-parallel
    group; under context parallelism, when the experts are not split over expert-parallel
    ranks and their tensor parallelism is the dense one, tensor x context parallel (the
    layer's FP8 scope), since the context-parallel ranks then run the same experts on parts
    of the same sequences, as one process would on all of them."""
    widened = linear.fp8.amax_group
    if (widened is not None and config.expert_model_parallel_size == 1
            and group_size(linear.tp_group) == config.tensor_model_parallel_size):
        return widened
    return linear.tp_group


def _expert_linear(x: torch.Tensor, linear) -> torch.Tensor:
    """x [n, in] through one expert linear's weight and bias, without communication: in
    FP8 when the linear holds FP8 scaling state (its layer runs in FP8), amaxes reduced
    over ``expert_amax_group``. For ``torch._scaled_mm``,
    which wants every size a multiple of 16, an expert's token count (any number) is
    padded with zero rows, which change neither the amaxes nor any other row."""
    if linear.fp8 is None:
        return F.linear(x, linear.weight, linear.bias)
    backend = select_backend(linear.weight.device, linear.fp8.recipe.emulation)
    rows = x.size(0)
    pad = -rows % _FP8_ROW_ALIGN if backend == SCALED_MM else 0
    out = fp8_linear(F.pad(x, (0, 0, 0, pad)) if pad else x, linear.weight, linear.fp8,
                     amax_group=expert_amax_group(linear, linear.config), backend=backend)
    out = out[:rows] if pad else out
    return out if linear.bias is None else out + linear.bias


class SequentialMLP(torch.nn.Module):
    """This rank's experts, run one after the other.

    forward(expert_input [N, h] grouped by local expert, tokens_per_expert [E_local]
    ints summing to N, as a list or an int64 tensor) -> [N, h] in the same row order.
    """

    def __init__(self, config, layer_number: int, local_expert_indices: Sequence[int], expt_tp_group=None):
        super().__init__()
        self.config = config
        self.local_expert_indices = list(local_expert_indices)
        experts = []
        for global_index in self.local_expert_indices:
            with initialization_stream(f"layer{layer_number}/expert{global_index}"):
                experts.append(ExpertMLP(config, expt_tp_group))
        self.local_experts = torch.nn.ModuleList(experts)

    def forward(self, expert_input: torch.Tensor, tokens_per_expert) -> torch.Tensor:
        if isinstance(tokens_per_expert, torch.Tensor):
            # torch.split needs host sizes: the loop waits for the device here.
            tokens_per_expert = tokens_per_expert.tolist()
        chunks = torch.split(expert_input, list(tokens_per_expert), dim=0)
        outputs = [expert(chunk) for expert, chunk in zip(self.local_experts, chunks)]
        if not outputs:
            return expert_input
        return torch.cat(outputs, dim=0)


def grouped_mm_available(x: torch.Tensor, weights_t: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` can run x [N, k] times weights_t [G, k, n]: CUDA,
    bf16, Hopper or newer, k and n multiples of 8 (its 16-byte alignment rule)."""
    if not (hasattr(torch, "_grouped_mm") and x.is_cuda and x.dtype == torch.bfloat16):
        return False
    if torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    return x.size(-1) % 8 == 0 and weights_t.size(-1) % 8 == 0 and weights_t.size(-2) % 8 == 0


# Row alignment of each group for torch._grouped_mm where it needs one (16 rows keep every
# group's start 16-byte aligned for any dtype the kernel takes).
_GROUPED_MM_ROW_ALIGN = 16

_UNALIGNED_GROUPS_OK: Dict[torch.device, bool] = {}


def grouped_mm_takes_unaligned_groups(device: torch.device) -> bool:
    """Whether this torch's grouped GEMM takes bf16 groups of any row count, forward and
    backward (PyTorch 2.11 on Hopper does, bit for bit against per-group matmuls); then the
    rows need no padded buffer and no copies in and out of it. Probed once per device
    with a tiny forward and backward; an error means padding."""
    if device not in _UNALIGNED_GROUPS_OK:
        try:
            x = torch.ones(11, 16, device=device, dtype=torch.bfloat16, requires_grad=True)
            w = torch.ones(2, 16, 16, device=device, dtype=torch.bfloat16, requires_grad=True)
            out = torch._grouped_mm(x, w, offs=torch.tensor([3, 11], device=device, dtype=torch.int32))
            out.backward(torch.ones_like(out))
            _UNALIGNED_GROUPS_OK[device] = bool(torch.equal(out[0], torch.full_like(out[0], 16.0)))
        except RuntimeError as err:
            logger.info("grouped GEMM: groups padded to %d rows (%s)", _GROUPED_MM_ROW_ALIGN, err)
            _UNALIGNED_GROUPS_OK[device] = False
    return _UNALIGNED_GROUPS_OK[device]


@dataclass
class _PaddedGroups:
    """Where the N rows of G groups go in a buffer whose groups start at aligned rows:
    ``slot`` [N] (row in the buffer; None when the rows are used in place), ``rows`` (buffer rows, host), ``expert`` [N] (group
    of each row); ``offsets`` [G] int32 group ends for torch._grouped_mm, or
    ``group_rows`` (every group's padded size) for the bmm."""

    slot: Optional[torch.Tensor]
    rows: int
    expert: torch.Tensor
    offsets: Optional[torch.Tensor] = None
    group_rows: Optional[int] = None


def _row_groups(counts: torch.Tensor, num_rows: int):
    """(group of each row [N], position of each row within its group [N]) for rows
    grouped by ``counts`` [G]; no host synchronization (N is given)."""
    ends = torch.cumsum(counts, dim=0)
    rows = torch.arange(num_rows, device=counts.device)
    expert = torch.searchsorted(ends, rows, right=True)
    return expert, rows - (ends - counts).index_select(0, expert)


def _grouped_mm_groups(counts: torch.Tensor, num_rows: int) -> _PaddedGroups:
    """Groups padded to ``_GROUPED_MM_ROW_ALIGN`` rows. The buffer has its host-known upper
    bound of rows, N + G * (align - 1); rows past the last offset are never read back.
    Where the kernel takes groups as they are, no buffer (``slot`` None)."""
    if grouped_mm_takes_unaligned_groups(counts.device):
        expert, _ = _row_groups(counts, num_rows)
        return _PaddedGroups(None, num_rows, expert, offsets=torch.cumsum(counts, dim=0).to(torch.int32))
    align = _GROUPED_MM_ROW_ALIGN
    padded = (counts + align - 1) // align * align
    ends = torch.cumsum(padded, dim=0)
    expert, position = _row_groups(counts, num_rows)
    slot = (ends - padded).index_select(0, expert) + position
    return _PaddedGroups(slot, num_rows + counts.numel() * (align - 1), expert, offsets=ends.to(torch.int32))


def _bmm_groups(counts: torch.Tensor, num_rows: int) -> _PaddedGroups:
    """Every group padded to the largest; waits for the device (the bmm fallback only)."""
    group_rows = int(counts.max().item())
    expert, position = _row_groups(counts, num_rows)
    slot = expert * group_rows + position
    return _PaddedGroups(slot, counts.numel() * group_rows, expert, group_rows=group_rows)


def _grouped_linear(x: torch.Tensor, weights: torch.Tensor, groups: _PaddedGroups) -> torch.Tensor:
    """Rows of group i times weights[i]^T: x [N, k] grouped as ``groups`` says, weights
    [G, n, k] -> [N, n]. One grouped GEMM (``groups.offsets``) or one bmm over groups
    padded to the largest. Rows move by copies and gathers, with no atomics in backward."""
    w_t = weights.transpose(-2, -1)
    if groups.slot is None:
        return torch._grouped_mm(x, w_t, offs=groups.offsets)
    buffer = scatter_rows(x, groups.slot, groups.rows)
    if groups.offsets is not None:
        out = torch._grouped_mm(buffer, w_t, offs=groups.offsets)
    else:
        out = torch.bmm(buffer.view(weights.size(0), groups.group_rows, -1), w_t).flatten(0, 1)
    return gather_rows(out, groups.slot)


class GroupedMLP(SequentialMLP):
    """The same experts and parameters as ``SequentialMLP``, computed as two grouped
    GEMMs over all local experts (``torch._grouped_mm`` on Hopper in bf16, without host
    synchronization; else a bmm over inputs padded to the largest expert's token count;
    in FP8 ``fp8.grouped_linear``)."""

    _STACKED = ("linear_fc1.weight", "linear_fc2.weight", "linear_fc1.bias", "linear_fc2.bias")

    def __init__(self, config, layer_number: int, local_expert_indices: Sequence[int], expt_tp_group=None):
        super().__init__(config, layer_number, local_expert_indices, expt_tp_group)
        self._place_weights_adjacent()

    def _expert_params(self, name: str):
        """The local experts' parameter ``name`` (e.g. "linear_fc1.weight"), in expert order,
        or None when the experts have none (no biases)."""
        linear, attribute = name.split(".")
        params = [getattr(getattr(e, linear), attribute) for e in self.local_experts]
        return None if not params or params[0] is None else params

    def _place_weights_adjacent(self) -> None:
        for name in self._STACKED:
            params = self._expert_params(name)
            if params is not None and not expert_weights.are_adjacent(params):
                expert_weights.place_adjacent(params)

    def _adjacent_names(self):
        """The names in ``_STACKED`` whose parameters are adjacent views now."""
        return [n for n in self._STACKED
                if self._expert_params(n) is not None and expert_weights.are_adjacent(self._expert_params(n))]

    def _apply(self, fn, recurse=True):
        # A dtype or device move gives every parameter its own new storage: put the weights
        # back side by side, unless some wrapper had already placed them elsewhere.
        adjacent = self._adjacent_names()
        module = super()._apply(fn, recurse)
        for name in adjacent:
            params = self._expert_params(name)
            if not expert_weights.are_adjacent(params):
                expert_weights.place_adjacent(params)
        return module

    def _groups(self, expert_input: torch.Tensor, counts: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor):
        n = expert_input.size(0)
        if grouped_mm_available(expert_input, fc1.transpose(-2, -1)) and grouped_mm_available(
            expert_input, fc2.transpose(-2, -1)
        ):
            return _grouped_mm_groups(counts, n)
        return _bmm_groups(counts, n)

    def forward(self, expert_input: torch.Tensor, tokens_per_expert) -> torch.Tensor:
        if expert_input.size(0) == 0:
            return super().forward(expert_input, tokens_per_expert)
        counts = torch.as_tensor(tokens_per_expert, dtype=torch.long).to(expert_input.device)
        fc1 = expert_weights.stacked(self._expert_params("linear_fc1.weight"))
        fc2 = expert_weights.stacked(self._expert_params("linear_fc2.weight"))
        first = self.local_experts[0]
        if first.linear_fc1.fp8 is not None:
            expert_of_row, _ = _row_groups(counts, expert_input.size(0))
            linear = self._fp8_linear(counts)
        else:
            groups = self._groups(expert_input, counts, fc1, fc2)
            expert_of_row = groups.expert
            fuse = self.config.gradient_accumulation_fusion and groups.slot is None and groups.offsets is not None

            def linear(x, weights, name):
                params = self._expert_params(name + ".weight")
                if fuse and accumulates_in_gemm(params):
                    return grouped_linear_accumulating(x, params, groups.offsets)
                return _grouped_linear(x, weights, groups)
        intermediate = linear(expert_input, fc1, "linear_fc1")
        if first.linear_fc1.bias is not None:
            bias = expert_weights.stacked(self._expert_params("linear_fc1.bias"))
            intermediate = intermediate + bias.index_select(0, expert_of_row)
        intermediate = first.activate(intermediate)
        out = linear(intermediate, fc2, "linear_fc2")
        if first.linear_fc2.bias is not None:
            out = out + expert_weights.stacked(self._expert_params("linear_fc2.bias")).index_select(0, expert_of_row)
        return out

    def _fp8_linear(self, counts: torch.Tensor):
        """The grouped linear in FP8 (``fp8.grouped_linear``): each expert's own scaling
        state, the GEMMs grouped on an FP8 GPU, emulated per expert otherwise."""
        first = self.local_experts[0]
        backend = select_backend(first.linear_fc1.weight.device, first.linear_fc1.fp8.recipe.emulation)

        def linear(x: torch.Tensor, weights: torch.Tensor, name: str) -> torch.Tensor:
            layers = [getattr(e, name) for e in self.local_experts]
            return fp8_grouped_linear(x, weights, [layer.fp8 for layer in layers], counts,
                                      amax_group=expert_amax_group(layers[0], self.config), backend=backend)
        return linear


def build_experts(config, layer_number: int, local_expert_indices: Sequence[int], expt_tp_group=None):
    """``GroupedMLP`` with --moe-grouped-gemm, else ``SequentialMLP``."""
    cls = GroupedMLP if config.moe_grouped_gemm else SequentialMLP
    return cls(config, layer_number, local_expert_indices, expt_tp_group)
