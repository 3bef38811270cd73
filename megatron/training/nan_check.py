"""Stop before the optimizer step when a loss or gradient is NaN or Inf.

Every rank checks its own loss and gradients; one all-reduce tells every rank which
ranks saw a bad value, so all of them raise together (none is left waiting in a
collective) and the message names the ranks, the iteration and what was bad.
"""

from __future__ import annotations

from typing import Iterable, List

import torch
import torch.distributed as dist

from megatron.core.fp8.scaling import fp8_state_is_finite
from megatron.core.tensor_parallel.collectives import comm_device


class NonFiniteError(RuntimeError):
    """A NaN or Inf reached the loss or the gradients."""


def _local_grad_flag(model_chunks) -> torch.Tensor:
    grads: List[torch.Tensor] = []
    for chunk in model_chunks:
        for p in chunk.parameters():
            g = getattr(p, "main_grad", None)
            if g is None:
                g = p.grad
            if g is not None:
                # FSDP2: this rank's shard (every rank checks its own).
                grads.append(g.to_local() if hasattr(g, "to_local") else g)
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads)
    return (~torch.isfinite(torch.stack(norms).sum())).float()


def _local_loss_flag(losses: Iterable[torch.Tensor]) -> torch.Tensor:
    flags = [(~torch.isfinite(l.detach().float())).any().float() for l in losses]
    return torch.stack(flags).max() if flags else torch.zeros(())


def check_finite(losses: Iterable[torch.Tensor], model_chunks, iteration: int, check_grads: bool = True,
                 group=None) -> None:
    """Raise NonFiniteError on every rank if any rank has a non-finite loss or gradient."""
    loss_flag = _local_loss_flag(list(losses))
    grad_flag = _local_grad_flag(model_chunks) if check_grads else torch.zeros(())
    device = comm_device(group) if dist.is_initialized() else loss_flag.device
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    rank = dist.get_rank(group) if dist.is_initialized() else 0
    table = torch.zeros(world, 3, device=device)
    table[rank, 0] = loss_flag.to(device)
    table[rank, 1] = grad_flag.to(device)
    # fp16 overflows are the loss scaler's business, in the FP8 gradient amaxes too
    table[rank, 2] = float(check_grads and not fp8_state_is_finite(model_chunks))
    if world > 1:
        dist.all_reduce(table, group=group)
    if not bool(table.any()):
        return
    bad_loss = [r for r in range(world) if table[r, 0] > 0]
    bad_grad = [r for r in range(world) if table[r, 1] > 0]
    bad_fp8 = [r for r in range(world) if table[r, 2] > 0]
    what = []
    if bad_loss:
        what.append(f"NaN/Inf in the loss on rank(s) {bad_loss}")
    if bad_grad:
        what.append(f"NaN/Inf in the gradients on rank(s) {bad_grad} (after the data-parallel reduction)")
    if bad_fp8:
        what.append(f"NaN/Inf in the FP8 amax history or scales on rank(s) {bad_fp8}")
    raise NonFiniteError(
        f"iteration {iteration}: {'; '.join(what)}. The optimizer step was not taken. Lower --lr, "
        "check the data, or use --bf16 / fp16 loss scaling; --no-check-for-nan-in-loss-and-grad "
        "disables this check."
    )
