"""Learning-rate and weight-decay schedules, stepped in SAMPLES (as Megatron).

Each training iteration calls ``step(global_batch_size)``; warmup, decay and weight-decay
horizons are therefore sample counts. Param groups may carry ``max_lr``/``min_lr``
(e.g. a decoupled embedding LR) and ``lr_mult``/``wd_mult`` multipliers.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

logger = logging.getLogger(__name__)

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")
WD_INCR_STYLES = ("constant", "linear", "cosine")


def wsd_anneal_coefficient(style: str, ratio: float) -> float:
    """Fraction of (max_lr - min_lr) kept at ``ratio`` in [0, 1] of the WSD anneal phase."""
    if style == "exponential":
        return 2.0 * math.pow(0.5, ratio) - 1.0
    if style == "linear":
        return 1.0 - ratio
    if style == "cosine":
        return 0.5 * (math.cos(math.pi * ratio) + 1.0)
    if style == "minus_sqrt":
        return 1.0 - math.sqrt(ratio)
    raise ValueError(f"--lr-wsd-decay-style {style!r} is not one of {WSD_DECAY_STYLES}")


class OptimizerParamScheduler:
    """Sets ``lr`` and ``weight_decay`` of every param group of ``optimizer``.

    Steps count samples. LR: linear warmup from ``init_lr`` to ``max_lr`` over
    ``lr_warmup_steps``; then ``lr_decay_style`` down to ``min_lr`` at ``lr_decay_steps``;
    ``min_lr`` afterwards. Weight decay goes from ``start_wd`` to ``end_wd`` over
    ``wd_incr_steps`` in ``wd_incr_style``.
    """

    def __init__(
        self,
        optimizer,
        init_lr: float,
        max_lr: float,
        min_lr: float,
        lr_warmup_steps: int,
        lr_decay_steps: int,
        lr_decay_style: str,
        start_wd: float,
        end_wd: float,
        wd_incr_steps: int,
        wd_incr_style: str,
        use_checkpoint_opt_param_scheduler: bool = True,
        override_opt_param_scheduler: bool = False,
        wsd_decay_steps: Optional[int] = None,
        lr_wsd_decay_style: Optional[str] = None,
    ) -> None:
        self.optimizer = optimizer
        self.init_lr = init_lr
        self.max_lr = float(max_lr)
        self.min_lr = min_lr
        self.lr_warmup_steps = lr_warmup_steps
        self.lr_decay_steps = lr_decay_steps
        self.lr_decay_style = lr_decay_style
        self.wsd_decay_steps = wsd_decay_steps
        self.lr_wsd_decay_style = lr_wsd_decay_style
        self.start_wd = start_wd
        self.end_wd = end_wd
        self.wd_incr_steps = wd_incr_steps
        self.wd_incr_style = wd_incr_style
        self.override_opt_param_scheduler = override_opt_param_scheduler
        self.use_checkpoint_opt_param_scheduler = use_checkpoint_opt_param_scheduler
        self.num_steps = 0
        self._validate()
        self.step(0)
        logger.info("learning rate decay style: %s", self.lr_decay_style)

    def _validate(self) -> None:
        if self.min_lr < 0.0:
            raise ValueError(f"--min-lr must be >= 0, got {self.min_lr}")
        if self.max_lr < self.min_lr:
            raise ValueError(f"--min-lr {self.min_lr} is larger than --lr {self.max_lr}: the rule is min_lr <= lr")
        if self.init_lr > self.max_lr:
            raise ValueError(
                f"--lr-warmup-init {self.init_lr} is larger than --lr {self.max_lr}: warmup rises "
                "from the init value to --lr; lower --lr-warmup-init"
            )
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise ValueError(f"--lr-decay-style {self.lr_decay_style!r} is not one of {LR_DECAY_STYLES}")
        if self.lr_decay_steps <= 0:
            raise ValueError(
                f"the LR decay horizon must be positive, got {self.lr_decay_steps} samples: set "
                "--lr-decay-iters/--lr-decay-samples or --train-iters/--train-samples"
            )
        if self.lr_warmup_steps >= self.lr_decay_steps:
            raise ValueError(
                f"LR warmup ({self.lr_warmup_steps} samples) must be shorter than the decay horizon "
                f"({self.lr_decay_steps} samples): lower --lr-warmup-iters/--lr-warmup-samples or raise "
                "--lr-decay-iters/--lr-decay-samples"
            )
        if self.lr_decay_style == "WSD":
            if self.wsd_decay_steps is None:
                raise ValueError(
                    "--lr-decay-style WSD needs the anneal length: set --lr-wsd-decay-iters or --lr-wsd-decay-samples"
                )
            if self.lr_wsd_decay_style not in WSD_DECAY_STYLES:
                raise ValueError(f"--lr-wsd-decay-style {self.lr_wsd_decay_style!r} is not one of {WSD_DECAY_STYLES}")
        if self.wd_incr_style not in WD_INCR_STYLES:
            raise ValueError(f"--weight-decay-incr-style {self.wd_incr_style!r} is not one of {WD_INCR_STYLES}")
        if self.wd_incr_style == "constant" and self.start_wd != self.end_wd:
            raise ValueError(
                f"--weight-decay-incr-style constant needs --start-weight-decay ({self.start_wd}) == "
                f"--end-weight-decay ({self.end_wd}); pick linear/cosine or make them equal"
            )
        if self.start_wd < 0.0 or self.end_wd < self.start_wd:
            raise ValueError(
                f"weight decay must satisfy 0 <= --start-weight-decay ({self.start_wd}) <= "
                f"--end-weight-decay ({self.end_wd})"
            )
        if self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler:
            raise ValueError(
                "--override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler are "
                "mutually exclusive: choose whether the command line or the checkpoint wins"
            )

    def get_wd(self) -> float:
        """Weight decay at the current step (before a group's ``wd_mult``)."""
        if self.num_steps > self.wd_incr_steps or self.wd_incr_style == "constant":
            return self.end_wd
        ratio = float(self.num_steps) / float(self.wd_incr_steps)
        if self.wd_incr_style == "linear":
            coeff = ratio
        else:
            coeff = 0.5 * (math.cos(math.pi * (1.0 - ratio)) + 1.0)
        return self.start_wd + coeff * (self.end_wd - self.start_wd)

    def get_lr(self, param_group: dict) -> float:
        """LR of ``param_group`` at the current step (before its ``lr_mult``)."""
        max_lr = param_group.get("max_lr", self.max_lr)
        min_lr = param_group.get("min_lr", self.min_lr)
        if self.lr_warmup_steps > 0 and self.num_steps <= self.lr_warmup_steps:
            return self.init_lr + (max_lr - self.init_lr) * float(self.num_steps) / float(self.lr_warmup_steps)
        if self.lr_decay_style == "constant":
            return max_lr
        if self.num_steps > self.lr_decay_steps:
            return min_lr
        if self.lr_decay_style == "inverse-square-root":
            warmup = max(self.lr_warmup_steps, 1)
            steps = max(self.num_steps, 1)
            return max(min_lr, max_lr * math.sqrt(warmup) / math.sqrt(steps))
        decay_ratio = float(self.num_steps - self.lr_warmup_steps) / float(self.lr_decay_steps - self.lr_warmup_steps)
        if self.lr_decay_style == "linear":
            coeff = 1.0 - decay_ratio
        elif self.lr_decay_style == "cosine":
            coeff = 0.5 * (math.cos(math.pi * decay_ratio) + 1.0)
        else:
            anneal_start = self.lr_decay_steps - self.wsd_decay_steps
            if self.num_steps <= anneal_start:
                coeff = 1.0
            else:
                ratio = float(self.num_steps - anneal_start) / float(self.wsd_decay_steps)
                coeff = wsd_anneal_coefficient(self.lr_wsd_decay_style, ratio)
        return min_lr + coeff * (max_lr - min_lr)

    def step(self, increment: int) -> None:
        """Advance by ``increment`` samples and write lr / weight_decay into every group."""
        self.num_steps += increment
        new_wd = self.get_wd()
        for group in self.optimizer.param_groups:
            group["lr"] = self.get_lr(group) * group.get("lr_mult", 1.0)
            group["weight_decay"] = new_wd * group.get("wd_mult", 1.0)

    def state_dict(self) -> dict:
        """Megatron's keys, plus the WSD settings."""
        return {
            "max_lr": self.max_lr,
            "lr_warmup_steps": self.lr_warmup_steps,
            "num_steps": self.num_steps,
            "lr_decay_style": self.lr_decay_style,
            "lr_decay_steps": self.lr_decay_steps,
            "min_lr": self.min_lr,
            "start_wd": self.start_wd,
            "end_wd": self.end_wd,
            "wd_incr_style": self.wd_incr_style,
            "wd_incr_steps": self.wd_incr_steps,
            "wsd_decay_steps": self.wsd_decay_steps,
            "lr_wsd_decay_style": self.lr_wsd_decay_style,
        }

    def _check_and_set(self, current, saved, name: str):
        """The value to use for ``name``: ours with --override-opt-param-scheduler, the
        checkpoint's with --use-checkpoint-opt-param-scheduler, else they must agree.
        Steps count samples, so ``name`` says samples: resuming with a larger
        --train-iters changes the decay length in samples, not in iterations."""
        if self.override_opt_param_scheduler:
            return current
        if not self.use_checkpoint_opt_param_scheduler and current != saved:
            raise ValueError(
                f"optimizer scheduler value {name} from the command line ({current}) differs from "
                f"the checkpoint ({saved}): pass --use-checkpoint-opt-param-scheduler to take the "
                "checkpoint's, or --override-opt-param-scheduler to take the command line's"
            )
        return saved

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the schedule; older Megatron key names are accepted."""
        sd = state_dict
        max_lr = sd["start_lr"] if "start_lr" in sd else sd["max_lr"]
        self.max_lr = self._check_and_set(self.max_lr, max_lr, "learning rate")
        self.min_lr = self._check_and_set(self.min_lr, sd["min_lr"], "minimum learning rate")
        warmup = next(sd[k] for k in ("warmup_iter", "warmup_steps", "lr_warmup_steps") if k in sd)
        self.lr_warmup_steps = self._check_and_set(self.lr_warmup_steps, warmup, "warmup samples (--lr-warmup-iters x --global-batch-size, or --lr-warmup-samples)")
        decay = next(sd[k] for k in ("end_iter", "decay_steps", "lr_decay_steps") if k in sd)
        self.lr_decay_steps = self._check_and_set(
            self.lr_decay_steps, decay,
            "decay samples (--lr-decay-iters, else --train-iters, x --global-batch-size; or --lr-decay-samples)")
        style = sd["decay_style"] if "decay_style" in sd else sd["lr_decay_style"]
        self.lr_decay_style = self._check_and_set(self.lr_decay_style, style, "learning rate decay style")
        if "wsd_decay_steps" in sd:
            self.wsd_decay_steps = self._check_and_set(self.wsd_decay_steps, sd["wsd_decay_steps"], "WSD decay steps")
            self.lr_wsd_decay_style = self._check_and_set(
                self.lr_wsd_decay_style, sd["lr_wsd_decay_style"], "WSD decay style"
            )
        num_steps = sd["num_iters"] if "num_iters" in sd else sd["num_steps"]
        if "start_wd" in sd:
            self.start_wd = self._check_and_set(self.start_wd, sd["start_wd"], "start weight decay")
            self.end_wd = self._check_and_set(self.end_wd, sd["end_wd"], "end weight decay")
            self.wd_incr_steps = self._check_and_set(
                self.wd_incr_steps, sd["wd_incr_steps"], "weight decay increment samples"
            )
            self.wd_incr_style = self._check_and_set(self.wd_incr_style, sd["wd_incr_style"], "weight decay incr style")
        self.num_steps = 0
        self.step(num_steps)
