"""``MegatronModule`` and ``Float16Module``, Megatron-Core's model base class and
half-precision wrapper, for scripts that subclass or wrap with them.

Our own models are plain ``torch.nn.Module`` subclasses built directly in their parameter
dtype, so neither class is needed by the package. ``sharded_state_dict`` derives each
tensor's shard from the module itself (``dist_checkpointing.state_dict_api``).
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron.core import parallel_state
from megatron.core.dist_checkpointing.state_dict_api import model_sharded_state_dict


class MegatronModule(torch.nn.Module):
    """A module that keeps its ``config`` (a ``TransformerConfig``)."""

    def __init__(self, config=None):
        super().__init__()
        self.config = config

    def state_dict_for_save_checkpoint(self, prefix: str = "", keep_vars: bool = False):
        """The state dict a checkpoint saves (the plain ``state_dict``)."""
        return self.state_dict(prefix=prefix, keep_vars=keep_vars)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """{name: ShardedTensor} of this module for ``dist_checkpointing.save``/``load``."""
        if sharded_offsets:
            raise ValueError("sharded_state_dict(sharded_offsets=...) is not supported; the keys here are already global")
        return model_sharded_state_dict(self, prefix, getattr(self, "pg_collection", None))

    def set_is_first_microbatch(self) -> None:
        """Megatron-Core hook for FP8 weight caching; nothing is cached here."""


def _convert(value, dtype: torch.dtype, only_float: bool = True):
    """``value`` with its floating-point tensors (nested in tuples/lists/dicts) cast to ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if (value.is_floating_point() or not only_float) else value
    if isinstance(value, (tuple, list)):
        return type(value)(_convert(item, dtype) for item in value)
    if isinstance(value, dict):
        return {key: _convert(item, dtype) for key, item in value.items()}
    return value


class Float16Module(MegatronModule):
    """Runs ``module`` in fp16 (``config.fp16``) or bf16 (``config.bf16``): its parameters are
    cast at wrap time, floating-point inputs are cast on the first pipeline stage and
    outputs are returned in fp32 on the last one, as Megatron-Core's wrapper does."""

    def __init__(self, config, module: torch.nn.Module):
        super().__init__(config)
        if getattr(config, "fp16", False):
            self.dtype = torch.float16
        elif getattr(config, "bf16", False):
            self.dtype = torch.bfloat16
        else:
            raise ValueError("Float16Module needs config.fp16 or config.bf16 (--fp16 / --bf16) set")
        self.add_module("module", module.to(self.dtype))

    def set_input_tensor(self, input_tensor: Optional[torch.Tensor]) -> None:
        return self.module.set_input_tensor(input_tensor)

    def forward(self, *inputs, **kwargs):
        first = parallel_state.is_pipeline_first_stage(ignore_virtual=False) if parallel_state.model_parallel_is_initialized() else True
        last = parallel_state.is_pipeline_last_stage(ignore_virtual=False) if parallel_state.model_parallel_is_initialized() else True
        if first:
            inputs = _convert(inputs, self.dtype)
            kwargs = _convert(kwargs, self.dtype)
        outputs = self.module(*inputs, **kwargs)
        return _convert(outputs, torch.float32) if last else outputs

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        return self.module.sharded_state_dict(prefix=prefix, sharded_offsets=sharded_offsets, metadata=metadata)

    def state_dict(self, destination=None, prefix: str = "", keep_vars: bool = False):
        """The wrapped module's state dict (no ``module.`` prefix), as Megatron saves it."""
        return self.module.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)

    def state_dict_for_save_checkpoint(self, prefix: str = "", keep_vars: bool = False):
        return self.module.state_dict(prefix=prefix, keep_vars=keep_vars)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)
