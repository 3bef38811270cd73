"""TensorBoard and Weights & Biases writers, on the last rank (which holds the loss)."""

from __future__ import annotations

import logging
from typing import Dict, Optional

from megatron.training.rank_print import is_last_rank

logger = logging.getLogger(__name__)


def build_tensorboard_writer(args):
    """A SummaryWriter for --tensorboard-dir on the last rank, else None."""
    if not args.tensorboard_dir or not is_last_rank():
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError(
            "--tensorboard-dir needs the tensorboard package: pip install tensorboard "
            "(or pip install 'megatron-lm-open[logging]')"
        ) from None
    return SummaryWriter(log_dir=args.tensorboard_dir, max_queue=args.tensorboard_queue_size)


def build_wandb_writer(args):
    """A wandb run for --wandb-project on the last rank, when wandb is installed."""
    if not args.wandb_project or not is_last_rank():
        return None
    try:
        import wandb
    except ImportError:
        logger.warning("--wandb-project is set but wandb is not installed: pip install wandb; not logging to wandb")
        return None
    save_dir = args.wandb_save_dir or (args.save + "/wandb" if args.save else None)
    wandb.init(
        project=args.wandb_project,
        name=args.wandb_exp_name or None,
        entity=args.wandb_entity or None,
        dir=save_dir,
        config=vars(args),
    )
    return wandb


class ScalarWriters:
    """Sends the same scalars to every configured writer."""

    def __init__(self, tensorboard=None, wandb=None):
        self.tensorboard = tensorboard
        self.wandb = wandb

    @property
    def active(self) -> bool:
        return self.tensorboard is not None or self.wandb is not None

    def write(self, scalars: Dict[str, float], step: int, samples: Optional[int] = None) -> None:
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, step)
                if samples is not None:
                    self.tensorboard.add_scalar(f"{key} vs samples", value, samples)
        if self.wandb is not None:
            self.wandb.log(dict(scalars), step=step)

    def flush(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
