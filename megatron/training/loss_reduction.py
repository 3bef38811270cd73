"""Reduce the per-micro-batch loss reports to one value per key for the global batch."""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.distributed as dist

from megatron.core.process_groups import ProcessGroups


def reduce_reported_losses(reported: List[dict], pg: ProcessGroups, keep_sum_and_count: bool = False) -> Dict[str, torch.Tensor]:
    """Token-weighted loss over the global batch: sum of losses / sum of tokens.

    Each report maps a key to a 2-element tensor [loss sum, token count] (or a scalar,
    which is averaged over micro-batches). Sums are all-reduced over the data (and
    context) parallel group. Values stay on the device: no host sync here.
    """
    if not reported:
        return {}
    out: Dict[str, torch.Tensor] = {}
    for key in reported[0]:
        values = [r[key].detach().float().view(-1) for r in reported]
        if values[0].numel() == 2:
            total = torch.stack(values).sum(dim=0)
        else:
            total = torch.stack([torch.cat([v.view(1), torch.ones(1, device=v.device)]) for v in values]).sum(dim=0)
        if dist.is_initialized() and pg.size("dp_cp") > 1:
            dist.all_reduce(total, group=pg.dp_cp)
        out[key] = total if keep_sum_and_count else total[0] / total[1]
    return out
