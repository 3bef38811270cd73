"""The process-wide objects Megatron's scripts reach through getters: args, timers, writers,
tokenizer.

``set_global_variables(args)`` is called once by initialization; the training layer later
installs the other objects with the ``set_*`` functions. Getters raise ``RuntimeError`` when
their object was never set (args) or return None (optional writers).
"""

from __future__ import annotations

import argparse
from typing import Any, Optional

_ARGS: Optional[argparse.Namespace] = None
_TIMERS: Any = None
_TENSORBOARD_WRITER: Any = None
_WANDB_WRITER: Any = None
_TOKENIZER: Any = None


def set_global_variables(args: argparse.Namespace) -> None:
    """Install the validated ``args`` namespace as the global one."""
    global _ARGS
    if args is None:
        raise ValueError("set_global_variables needs the parsed and validated args namespace, got None")
    _ARGS = args


def set_args(args: argparse.Namespace) -> None:
    """Replace the global args (e.g. after loading args from a checkpoint)."""
    set_global_variables(args)


def get_args() -> argparse.Namespace:
    """The global args; raises RuntimeError before ``set_global_variables``."""
    if _ARGS is None:
        raise RuntimeError(
            "megatron args are not initialized: call megatron.training.initialize_megatron() "
            "(or set_global_variables(validate_args(parse_args()))) first"
        )
    return _ARGS


def set_timers(timers: Any) -> None:
    """Install the global timers object."""
    global _TIMERS
    _TIMERS = timers


def get_timers() -> Any:
    """The global timers; raises RuntimeError when none were installed."""
    if _TIMERS is None:
        raise RuntimeError("timers are not initialized: call set_timers() (done by initialization)")
    return _TIMERS


def set_tensorboard_writer(writer: Any) -> None:
    """Install the TensorBoard SummaryWriter (only on the rank that writes)."""
    global _TENSORBOARD_WRITER
    _TENSORBOARD_WRITER = writer


def get_tensorboard_writer() -> Any:
    """The TensorBoard writer, or None when TensorBoard is off on this rank."""
    return _TENSORBOARD_WRITER


def set_wandb_writer(writer: Any) -> None:
    """Install the Weights & Biases run (only on the rank that writes)."""
    global _WANDB_WRITER
    _WANDB_WRITER = writer


def get_wandb_writer() -> Any:
    """The Weights & Biases run, or None when W&B is off on this rank."""
    return _WANDB_WRITER


def set_tokenizer(tokenizer: Any) -> None:
    """Install the global tokenizer."""
    global _TOKENIZER
    _TOKENIZER = tokenizer


def get_tokenizer() -> Any:
    """The global tokenizer; raises RuntimeError before ``set_tokenizer``."""
    if _TOKENIZER is None:
        raise RuntimeError("tokenizer is not initialized: call set_tokenizer() (done by initialization)")
    return _TOKENIZER


def unset_global_variables() -> None:
    """Forget every global (for tests)."""
    global _ARGS, _TIMERS, _TENSORBOARD_WRITER, _WANDB_WRITER, _TOKENIZER
    _ARGS = _TIMERS = _TENSORBOARD_WRITER = _WANDB_WRITER = _TOKENIZER = None
