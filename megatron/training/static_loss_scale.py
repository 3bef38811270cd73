"""Stop a run whose static fp16 loss scale overflows every step.

With ``--fp16 --loss-scale S`` the scale never shrinks: if S makes every gradient overflow,
every step is skipped and the run would end with untouched weights and exit code 0. Dynamic
scaling (no --loss-scale) halves the scale on overflow and keeps Megatron's behaviour.
"""

from __future__ import annotations

from megatron.training.user_errors import UserError

# Consecutive skipped steps that end the run: a sane static scale overflows now and then, not
# ten times in a row. A run shorter than that stops after all its steps were skipped.
MAX_CONSECUTIVE_SKIPS = 10


class StaticLossScaleGuard:
    """Counts consecutive skipped steps under a static loss scale; raises a UserError at the limit."""

    def __init__(self, args, start_iteration: int):
        self.active = bool(args.fp16 and args.loss_scale is not None)
        self.loss_scale = args.loss_scale
        limit = MAX_CONSECUTIVE_SKIPS
        if args.train_iters:
            limit = min(limit, max(1, args.train_iters - start_iteration))
        self.limit = limit
        self.consecutive = 0

    def step(self, iteration: int, skipped: bool) -> None:
        if not self.active:
            return
        self.consecutive = self.consecutive + 1 if skipped else 0
        if self.consecutive >= self.limit:
            raise UserError(
                f"--loss-scale {self.loss_scale:g}: the fp16 gradients overflowed in {self.consecutive} "
                f"consecutive steps (up to iteration {iteration}), so none of them updated the weights. "
                "Fix: give a smaller --loss-scale (e.g. 4096), or leave --loss-scale out for dynamic "
                "loss scaling (--initial-loss-scale, --min-loss-scale)"
            )
