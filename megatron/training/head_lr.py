"""--head-lr-mult: which params count as the "head" whose learning rate it multiplies.

Megatron-LM applies the multiplier to the params whose name contains ``.head.`` (the
classification head of its vision finetuning); its language-model scripts pass no such
condition, so there the flag changes nothing. The same holds here: the rule is Megatron's,
and a run whose model has no ``head`` module is told so once at start-up.
"""

from __future__ import annotations

import logging
from typing import List

import torch

logger = logging.getLogger(__name__)


def is_head_param(name: str, param: torch.nn.Parameter) -> bool:
    """A param of a submodule named ``head`` (``head.weight`` at the top level counts too:
    Megatron's names always carry a wrapper prefix)."""
    return ".head." in f".{name}"


def head_lr_kwargs(head_lr_mult: float, model_chunks: List[torch.nn.Module]) -> dict:
    """``scale_lr_cond``/``lr_mult`` for ``get_megatron_optimizer``."""
    if head_lr_mult != 1.0 and not any(is_head_param(name, p) for chunk in model_chunks
                                       for name, p in chunk.named_parameters()):
        logger.warning("--head-lr-mult %s has no effect: the model has no params of a module named 'head' "
                       "(Megatron-LM applies it only to the classification head of vision finetuning)",
                       head_lr_mult)
    return {"scale_lr_cond": is_head_param, "lr_mult": head_lr_mult}
