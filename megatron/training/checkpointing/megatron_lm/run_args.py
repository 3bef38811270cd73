"""The run arguments and common state of Megatron-LM checkpoints, both ways.

Reading: Megatron's pickled ``Namespace`` comes through the restricted unpickler with its
enums as stand-ins; ``from_megatron`` turns the few we use into our plain values
(``attention_backend``, ``exit_signal``), renames what Megatron renamed, and drops other
stand-ins, so the namespace can fill ours (--use-checkpoint-args, the converter).

Writing: ``to_megatron`` keeps only plain values (numbers, strings, dtypes, containers of
them), which Megatron-LM's loader unpickles without our classes, and records that no
optimizer or RNG state was saved, so Megatron skips loading them on its own.
"""

from __future__ import annotations

import argparse
import enum
import logging
from typing import Any, Dict

import torch

from megatron.core.safe_unpickle import Recorded

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 3.0
# What Megatron-LM's torch_dist saves beside the args in ``common_state``.
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
# Megatron-Core's AttnBackend values.
_ATTENTION_BACKENDS = {1: "flash", 2: "fused", 3: "unfused", 4: "local", 5: "auto"}
# Megatron name -> our name, where Megatron's saved args use another spelling.
_RENAMED = {"layernorm_epsilon": "norm_epsilon"}


def _plain_enum(name: str, value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, Recorded):
        if value.qualname.endswith(".AttnBackend") and value.value in _ATTENTION_BACKENDS:
            return _ATTENTION_BACKENDS[value.value]
        return None
    return value


def from_megatron(saved: argparse.Namespace) -> argparse.Namespace:
    """A copy of Megatron's saved args with only values our code understands."""
    out = argparse.Namespace()
    for name, value in vars(saved).items():
        plain = _plain_enum(name, value)
        if plain is None and value is not None:
            logger.debug("Megatron-LM checkpoint args: %s=%r has no counterpart here; dropped", name, value)
            continue
        setattr(out, name, plain)
    for theirs, ours in _RENAMED.items():
        if hasattr(out, theirs) and not hasattr(out, ours):
            setattr(out, ours, getattr(out, theirs))
    return out


def _is_plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def to_megatron(args: argparse.Namespace) -> argparse.Namespace:
    """The plain part of our args, as Megatron-LM reads them from a checkpoint."""
    out = argparse.Namespace(**{k: v for k, v in vars(args).items() if _is_plain(v)})
    for theirs, ours in _RENAMED.items():
        if hasattr(out, ours):
            setattr(out, theirs, getattr(out, ours))
    out.no_save_optim, out.no_save_rng = True, True
    return out


def common_state(args: argparse.Namespace, iteration: int, num_flops: float) -> Dict[str, Any]:
    """The non-tensor state Megatron-LM stores once per checkpoint (``common_state``)."""
    return {
        "args": to_megatron(args),
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": iteration,
        "num_floating_point_operations_so_far": num_flops,
        "content_metadata": dict(CONTENT_METADATA),
    }


def legacy_state(args: argparse.Namespace, iteration: int, num_flops: float) -> Dict[str, Any]:
    """The top-level entries of Megatron-LM's ``model_optim_rng.pt`` besides the model."""
    return {"args": to_megatron(args), "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration,
            "num_floating_point_operations_so_far": num_flops}
