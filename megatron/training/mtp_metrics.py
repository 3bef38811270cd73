"""Multi-token prediction losses for the iteration log, as Megatron reports them.

Each MTP depth k becomes the key ``mtp_k loss`` of the iteration's losses, after
``lm loss``: the unscaled masked mean loss of that depth, averaged over the iteration's
micro-batches and over the data-parallel ranks.
"""

from __future__ import annotations

from typing import Dict

import torch

from megatron.core import process_groups
from megatron.core.num_microbatches_calculator import get_num_microbatches
from megatron.core.transformer.multi_token_prediction import mtp_loss_tracker


def collect_mtp_losses(args, pg) -> Dict[str, torch.Tensor]:
    """Reduce and clear this iteration's MTP losses (collective over the data-parallel ranks)."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    values = mtp_loss_tracker().pop(args.mtp_num_layers, device=device) / get_num_microbatches()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(values, group=pg.dp_cp)
        values = values / process_groups.group_size(pg.dp_cp)
    return {f"mtp_{k + 1} loss": value for k, value in enumerate(values)}
