"""Which of this rank's optimizer params are offloaded to the CPU (--optimizer-cpu-offload).

As in Megatron's hybrid-device optimizer: params are taken in param-group order, whole, and
offloaded while the offloaded element count is below ``fraction`` x the total, so
--optimizer-offload-fraction 1.0 offloads all of them, 0.0 none, and 0.5 the first params
holding (at least) half of the elements. With the distributed optimizer the params are this
rank's pieces, so every data-parallel rank offloads its own share.
"""

from __future__ import annotations

from typing import Iterable, List

import torch


def offloaded_params(params: Iterable[torch.Tensor], fraction: float) -> List[torch.Tensor]:
    """The params (in order) whose master values and optimizer state live on the CPU."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"--optimizer-offload-fraction must be in [0, 1], got {fraction}")
    params = list(params)
    threshold = fraction * sum(p.numel() for p in params)
    chosen, numel = [], 0
    for param in params:
        if numel >= threshold:
            break
        chosen.append(param)
        numel += param.numel()
    return chosen
