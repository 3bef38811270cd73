"""The training application: flags, initialization, the training loop, logging.

The names Megatron-LM's scripts import from here (``get_args``, ``pretrain``,
``print_rank_0``, ...) resolve lazily, so importing one submodule (say the argument
parser) does not pull in the whole training stack.
"""

_EXPORTS = {
    "get_args": "megatron.training.global_vars",
    "get_timers": "megatron.training.global_vars",
    "get_tokenizer": "megatron.training.global_vars",
    "get_tensorboard_writer": "megatron.training.global_vars",
    "get_wandb_writer": "megatron.training.global_vars",
    "pretrain": "megatron.training.training",
    "initialize_megatron": "megatron.training.initialize",
    "print_rank_0": "megatron.training.rank_print",
    "print_rank_last": "megatron.training.rank_print",
    "is_last_rank": "megatron.training.rank_print",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'megatron.training' has no attribute {name!r}")
