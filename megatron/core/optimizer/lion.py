"""Lion (EvoLved Sign Momentum; Chen et al. 2023, "Symbolic Discovery of Optimization
Algorithms"), the optimizer behind --optimizer lion.

Per param ``p`` with gradient ``g``, momentum ``m`` (state ``exp_avg``, zero at first):

    update = sign(beta1 * m + (1 - beta1) * g)      # the interpolated momentum's sign
    p      = p * (1 - lr * weight_decay) - lr * update  # decoupled weight decay, as AdamW
    m      = beta2 * m + (1 - beta2) * g

Every element moves by exactly ``lr`` (or 0 where the interpolation is 0), so Lion wants a
smaller --lr (3-10x) and a larger --weight-decay than AdamW. Its one state tensor has the
param's shape, which the checkpoint code stores as ``exp_avg``. The update is elementwise,
so stepping a data-parallel shard of a param (the distributed optimizer) gives the same
numbers as stepping the whole param.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Tuple

import torch


class Lion(torch.optim.Optimizer):
    """Lion over ``params`` (tensors or param-group dicts, which may set their own ``lr``,
    ``betas`` and ``weight_decay``)."""

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: Tuple[float, float] = (0.95, 0.98),
                 weight_decay: float = 0.0):
        if lr < 0.0:
            raise ValueError(f"Lion: the learning rate must be >= 0, got {lr}")
        for name, beta in zip(("--lion-beta1", "--lion-beta2"), betas):
            if not 0.0 <= beta <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {beta}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, weight_decay = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                state = self.state[param]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                exp_avg = state["exp_avg"]
                if weight_decay != 0.0:
                    param.mul_(1.0 - lr * weight_decay)
                # lerp(m, g, 1 - beta) == beta * m + (1 - beta) * g
                update = exp_avg.lerp(grad, 1.0 - beta1).sign_()
                param.add_(update, alpha=-lr)
                exp_avg.lerp_(grad, 1.0 - beta2)
        return loss
