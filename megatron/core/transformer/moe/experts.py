"""Routed experts of one MoE layer: this rank's local experts, as a loop or a grouped GEMM.

Each expert is an MLP (fc1 -> activation -> fc2, fc1 = [gate; up] with --swiglu) whose
weights are split over the expert tensor-parallel group (fc1 by rows, fc2 by columns),
so its output on one rank is a partial sum that the token dispatcher adds up. Weights
live in ``local_experts.{i}.linear_fc{1,2}.weight`` (Megatron's SequentialMLP names) for
both paths, so checkpoints do not depend on --moe-grouped-gemm.

With --use-cpu-initialization inside ``layout_independent_initialization`` the full
weights of global expert g of layer L are drawn from a generator seeded by
(seed, "layer{L}/expert{g}"), so every expert-parallel layout builds the same model.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F

from megatron.core import tensor_parallel
from megatron.core.fusions.fused_bias_activation import bias_activation
from megatron.core.transformer.init_rng import initialization_stream
from megatron.core.transformer.activations import openai_gelu


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        intermediate = F.linear(x, self.linear_fc1.weight, self.linear_fc1.bias)
        intermediate = bias_activation(intermediate, None, self.activation_func, self.gated, self.bias_activation_fusion)
        return F.linear(intermediate, self.linear_fc2.weight, self.linear_fc2.bias)


class SequentialMLP(torch.nn.Module):
    """This rank's experts, run one after the other.

    forward(expert_input [N, h] grouped by local expert, tokens_per_expert list of
    E_local ints summing to N) -> [N, h] in the same row order.
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

    def forward(self, expert_input: torch.Tensor, tokens_per_expert: List[int]) -> torch.Tensor:
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


# Row alignment of each group for torch._grouped_mm (16 rows keep every group's start
# 16-byte aligned for any dtype the kernel takes).
_GROUPED_MM_ROW_ALIGN = 16


def _padded_slots(counts: torch.Tensor, padded_counts: torch.Tensor) -> torch.Tensor:
    """Row of each input row in a buffer where group g starts at sum(padded_counts[:g])."""
    n = int(counts.sum().item())
    starts = torch.cumsum(padded_counts, dim=0) - padded_counts
    first_row = torch.cumsum(counts, dim=0) - counts
    position = torch.arange(n, device=counts.device) - torch.repeat_interleave(first_row, counts)
    return torch.repeat_interleave(starts, counts) + position


def _grouped_linear(x: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of group i times weights[i]^T: x [N, k] grouped by ``counts`` [G],
    weights [G, n, k] -> [N, n]. One grouped GEMM when available (groups padded to 16
    rows), else one bmm over groups padded to the largest group."""
    w_t = weights.transpose(-2, -1)
    if grouped_mm_available(x, w_t):
        padded = (counts + _GROUPED_MM_ROW_ALIGN - 1) // _GROUPED_MM_ROW_ALIGN * _GROUPED_MM_ROW_ALIGN
        slot = _padded_slots(counts, padded)
        buffer = x.new_zeros(int(padded.sum().item()), x.size(-1)).index_copy(0, slot, x)
        offsets = torch.cumsum(padded, dim=0).to(torch.int32)
        return torch._grouped_mm(buffer, w_t, offs=offsets).index_select(0, slot)
    groups, rows = weights.size(0), int(counts.max().item())
    slot = _padded_slots(counts, torch.full_like(counts, rows))
    buffer = x.new_zeros(groups * rows, x.size(-1)).index_copy(0, slot, x)
    out = torch.bmm(buffer.view(groups, rows, -1), w_t)
    return out.reshape(groups * rows, -1).index_select(0, slot)


def _row_bias(bias: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per-row bias [N, n] from per-expert biases [G, n]."""
    return torch.repeat_interleave(bias, counts, dim=0)


class GroupedMLP(SequentialMLP):
    """The same experts and parameters as ``SequentialMLP``, computed as two grouped
    GEMMs over all local experts (``torch._grouped_mm`` on Hopper in bf16, else a bmm over
    inputs padded to the largest expert's token count)."""

    def forward(self, expert_input: torch.Tensor, tokens_per_expert: List[int]) -> torch.Tensor:
        if expert_input.size(0) == 0:
            return super().forward(expert_input, tokens_per_expert)
        counts = torch.tensor(list(tokens_per_expert), device=expert_input.device, dtype=torch.long)
        fc1 = torch.stack([e.linear_fc1.weight for e in self.local_experts])
        fc2 = torch.stack([e.linear_fc2.weight for e in self.local_experts])
        first = self.local_experts[0]
        intermediate = _grouped_linear(expert_input, fc1, counts)
        if first.linear_fc1.bias is not None:
            intermediate = intermediate + _row_bias(torch.stack([e.linear_fc1.bias for e in self.local_experts]), counts)
        intermediate = bias_activation(
            intermediate, None, first.activation_func, first.gated, first.bias_activation_fusion
        )
        out = _grouped_linear(intermediate, fc2, counts)
        if first.linear_fc2.bias is not None:
            out = out + _row_bias(torch.stack([e.linear_fc2.bias for e in self.local_experts]), counts)
        return out


def build_experts(config, layer_number: int, local_expert_indices: Sequence[int], expt_tp_group=None):
    """``GroupedMLP`` with --moe-grouped-gemm, else ``SequentialMLP``."""
    cls = GroupedMLP if config.moe_grouped_gemm else SequentialMLP
    return cls(config, layer_number, local_expert_indices, expt_tp_group)
