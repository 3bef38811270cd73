"""Delayed scaling over data-parallel replicas: one scaling state for all of them.

Each data-parallel replica quantizes its own micro-batches, so under ``delayed`` its amax
histories, and the scales derived from them, follow its own data. (Megatron reduces every
amax over the data-parallel ranks as it is taken; the linears here reduce over tensor x
context parallel ranks only, which saves a collective per quantization.) After each step's
forward and backward, ``merge_over_replicas`` makes the replicas' states one: the amax
histories are merged by a MAX all-reduce (row k holds every replica's k-th most recent
amax, since they run the same schedule) and the scales by a MIN all-reduce. The scale is
fp8_max / amax of the history's window (over 2^margin), decreasing in the amax, so the
smallest scale is the one the merged history gives; where a replica saw only zero amaxes
and kept an older scale, the smallest is still the safer one.

All replicas then hold the same state, which is the state a checkpoint stores, so a resume
continues bit for bit, and the next step starts from scales every replica shares. Under
``tensorwise`` each scale comes from the tensor at hand and the state is a record only: it
is left alone. The MoE experts' states are merged over the expert-data-parallel replicas.
"""

from __future__ import annotations

from typing import Iterable, List

import torch
import torch.distributed as dist

from megatron.core.fp8.scaling import Fp8Scaling
from megatron.core.process_groups import group_size


def delayed_states(chunks: Iterable[torch.nn.Module]):
    """(dense, expert) lists of the ``delayed`` scaling states of the model chunks."""
    dense: List[Fp8Scaling] = []
    experts: List[Fp8Scaling] = []
    for chunk in chunks:
        for name, module in chunk.named_modules():
            if isinstance(module, Fp8Scaling) and module.recipe.recipe == "delayed":
                (experts if ".experts." in name else dense).append(module)
    return dense, experts


@torch.no_grad()
def _merge(states: List[Fp8Scaling], group) -> None:
    histories = [s.amax_history for s in states]
    scales = [s.scale for s in states]
    history, scale = torch.stack(histories), torch.stack(scales)
    dist.all_reduce(history, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(scale, op=dist.ReduceOp.MIN, group=group)
    torch._foreach_copy_(histories, list(history.unbind(0)))
    torch._foreach_copy_(scales, list(scale.unbind(0)))


def merge_over_replicas(chunks: Iterable[torch.nn.Module], dp_group, expert_dp_group) -> None:
    """Give every data-parallel replica the same ``delayed`` scaling state (see the module
    docstring): ``dp_group`` the dense linears' replicas (data x context parallel),
    ``expert_dp_group`` the experts'. Nothing to do on one replica or without ``delayed``."""
    dense, experts = delayed_states(chunks)
    for states, group in ((dense, dp_group), (experts, expert_dp_group)):
        if states and group_size(group) > 1:
            _merge(states, group)
