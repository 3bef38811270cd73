"""Per-layer MoE metrics of the current iteration: balancing losses and token counts.

Routers ``record`` their (unscaled) auxiliary losses and tokens per expert every
micro-batch, adding in place into tensors kept for the whole run; the training loop reads
them once per iteration, reduces them across ranks and zeroes them. This is process-wide state, like Megatron's tracker,
because the values are produced deep inside the model and read by the training loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

import torch
import torch.distributed as dist

from megatron.core.process_groups import group_size


@dataclass
class _Metric:
    values: torch.Tensor  # [num_layers], summed over the iteration's micro-batches
    reduce_group: object = None  # ranks whose values add up to the layer's value (SP/TP split)


@dataclass
class MoEMetricsTracker:
    """Balancing losses by name and tokens per expert, per (global, 0-based) layer."""

    metrics: Dict[str, _Metric] = field(default_factory=dict)
    tokens_per_expert: Dict[int, torch.Tensor] = field(default_factory=dict)

    def record(self, name: str, value: torch.Tensor, layer_number: int, num_layers: int, reduce_group=None) -> None:
        """Add ``value`` (a 0-d tensor) to layer ``layer_number`` (1-based) of metric ``name``."""
        metric = self.metrics.get(name)
        if metric is None:
            metric = _Metric(torch.zeros(num_layers, device=value.device), reduce_group)
            self.metrics[name] = metric
        elif metric.values.numel() < num_layers:
            # Another model in this process recorded fewer layers first (multi-token
            # prediction adds layers after the decoder's): keep its values, make room.
            grown = torch.zeros(num_layers, device=metric.values.device)
            grown[:metric.values.numel()] = metric.values
            metric.values = grown
        metric.values[layer_number - 1] += value.detach().float().reshape(())

    def record_tokens(self, layer_number: int, tokens_per_expert: torch.Tensor) -> None:
        """Add this micro-batch's routed-token count per expert [E] of layer ``layer_number``."""
        counts = tokens_per_expert.detach().float()
        total = self.tokens_per_expert.get(layer_number - 1)
        if total is None or total.shape != counts.shape:
            total = torch.zeros_like(counts)
            self.tokens_per_expert[layer_number - 1] = total
        total += counts

    def clear(self) -> None:
        """Zero every value in place. The tensors are kept, so that a captured CUDA graph
        (``--cuda-graph-impl full_iteration``), whose replays add into the tensors that
        existed at its capture, keeps reporting into the ones the training loop reads."""
        for metric in self.metrics.values():
            metric.values.zero_()
        for counts in self.tokens_per_expert.values():
            counts.zero_()


_TRACKER = MoEMetricsTracker()


def get_moe_metrics_tracker() -> MoEMetricsTracker:
    """The process-wide tracker."""
    return _TRACKER


def _all_reduce(tensor: torch.Tensor, group, op=None) -> None:
    """Forward: reduce ``tensor`` in place over ``group`` (SUM unless ``op``). Backward:
    not differentiable (logging only). No-op for a 1-rank group."""
    if group is not None and group_size(group) > 1:
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM, group=group)


def reduce_moe_metrics(
    names: List[str], num_layers: int, pp_group=None, dp_group=None, device=None
) -> Dict[str, torch.Tensor]:
    """{name: [num_layers] values} summed over pipeline stages (each has its own layers)
    and the metric's reduce group, averaged over data-parallel ranks. Every rank must call
    it with the same ``names``; a name nobody recorded gives zeros."""
    tracker = get_moe_metrics_tracker()
    out = {}
    for name in names:
        metric = tracker.metrics.get(name)
        values = torch.zeros(num_layers, device=device) if metric is None else metric.values.clone()
        if metric is not None:
            _all_reduce(values, metric.reduce_group)
        _all_reduce(values, pp_group)
        _all_reduce(values, dp_group)
        out[name] = values / group_size(dp_group)
    return out


def reduce_tokens_per_expert(num_layers: int, num_experts: int, pp_group=None, dp_group=None, device=None):
    """[num_layers, E] routed tokens per expert of the iteration, summed over pipeline
    stages and data-parallel ranks (dense layers give zeros)."""
    table = torch.zeros(num_layers, num_experts, device=device)
    for layer, counts in get_moe_metrics_tracker().tokens_per_expert.items():
        table[layer] = counts.to(table.device)
    _all_reduce(table, pp_group)
    _all_reduce(table, dp_group)
    return table
