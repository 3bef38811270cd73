"""``TorchFullyShardedDataParallel``: data parallelism by PyTorch's FSDP2 (``fully_shard``).

Every parameter, gradient and optimizer state is sharded over the data x context
parallel ranks (ZeRO-3): each transformer layer is one ``fully_shard`` unit whose
parameters are all-gathered just before its forward (and again before its backward
when ``reshard_after_forward``), and whose gradients are reduce-scattered as soon as
its backward is done; the root unit holds the rest (embeddings, final norm, output
layer). Tensor-parallel layers stay inside: a tp rank's shard of a weight is what
FSDP shards further over dp, so FSDP composes with TP the way Megatron allows.

Precision. The sharded params are fp32 (they are the optimizer's main params); with
``param_dtype`` bf16 they are cast to bf16 as they are gathered, so forward and backward
compute in bf16 on the same values the mixed-precision optimizer would give; grads are
reduce-scattered in ``reduce_dtype`` (fp32 with --accumulate-allreduce-grads-in-fp32,
which --bf16 turns on) and accumulated in fp32 shards.

Micro-batches. Each micro-batch's grads are reduce-scattered in its backward and summed
into the fp32 shards (``no_sync`` is a no-op): holding full unsharded grads across
micro-batches would cost the memory FSDP is chosen to save.

Params keep the attributes the rest of the framework reads (``tensor_model_parallel``,
``sequence_parallel``, ``shared``, ``allreduce`` ...) across the swap to DTensors.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterable, Optional, Tuple, Type

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from megatron.core import process_groups
from megatron.core.distributed.distributed_data_parallel import broadcast_from_group_rank0
from megatron.core.process_groups import ProcessGroups, group_size
from megatron.core.tensor_parallel.partition import PARAM_SPLIT_ATTRIBUTES

logger = logging.getLogger(__name__)



def default_units() -> Tuple[Type[torch.nn.Module], ...]:
    """The module classes that become their own ``fully_shard`` unit: one per layer."""
    from megatron.core.ssm.mamba_layer import MambaLayer
    from megatron.core.transformer.transformer_layer import TransformerLayer

    return (TransformerLayer, MambaLayer)


def data_parallel_mesh(group) -> DeviceMesh:
    """A 1-D DeviceMesh over ``group`` (the data x context parallel ranks)."""
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return DeviceMesh.from_group(group, device_type)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view sharing its storage); other tensors as they are."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class TorchFullyShardedDataParallel(torch.nn.Module):
    """Wraps ``module`` (kept as ``.module``; forward delegates) in FSDP2.

    Args:
        config: the model's ``TransformerConfig``; with ``calculate_per_token_loss`` the
            grads are summed over dp, not averaged (finalize_model_grads divides by the
            token count).
        ddp_config: ``DistributedDataParallelConfig``; ``grad_reduce_in_fp32`` picks the
            reduce dtype.
        module: the model chunk (its params in any float dtype; they become fp32 shards).
        pg_collection: groups; the default ``ProcessGroups`` when None (taken once here).
        param_dtype: compute dtype of the gathered params (bf16 with --bf16), None for fp32.
        reshard_after_forward: free each layer's gathered params after its forward and
            gather them again for backward (--torch-fsdp2-no-reshard-after-forward turns
            it off: less communication, more memory).
        units: module classes wrapped as their own unit (default: the model's layers).
    """

    def __init__(
        self,
        config,
        ddp_config,
        module: torch.nn.Module,
        pg_collection: Optional[ProcessGroups] = None,
        *,
        param_dtype: Optional[torch.dtype] = None,
        reshard_after_forward: bool = True,
        units: Optional[Iterable[Type[torch.nn.Module]]] = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.ddp_config = ddp_config
        pgs = process_groups.resolve(pg_collection)
        self.pg_collection = pgs
        self.dp_cp_group = pgs.dp_cp
        self.mesh = data_parallel_mesh(self.dp_cp_group)
        attributes = _saved_attributes(module)
        with torch.no_grad():
            for param in module.parameters():
                # Identical replicas first (as DDP's broadcast_params): each rank keeps
                # its own slice of what dp rank 0 initialized.
                broadcast_from_group_rank0(param.data, self.dp_cp_group)
                param.data = param.data.float()
        reduce_dtype = torch.float32 if ddp_config.grad_reduce_in_fp32 or param_dtype is None else param_dtype
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
        kwargs = dict(mesh=self.mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
        unit_types = tuple(units) if units is not None else default_units()
        self.units = [m for m in module.modules() if isinstance(m, unit_types)]
        for unit in self.units:
            fully_shard(unit, **kwargs)
        for block in module.modules():
            # A layer's parameters are gathered when its own unit runs, so one layer must not
            # compute the next layer's input norm (TransformerBlock's chaining).
            if hasattr(block, "chain_layers"):
                block.chain_layers = False
        fully_shard(module, **kwargs)
        self.module = module
        _restore_attributes(module, attributes)
        # Per-token loss wants summed grads (finalize_model_grads divides by the token
        # count through scale_gradients); FSDP2 averages over dp. Its switch to a plain sum
        # (set_gradient_divide_factor) needs a pre-multiplied sum that gloo lacks, so the
        # average is undone in scale_gradients instead, which runs exactly then.
        self._undo_average = float(group_size(self.dp_cp_group)) if getattr(
            config, "calculate_per_token_loss", False) else 1.0
        logger.info(
            "FSDP2: %d layer unit(s) + root sharded over %d data-parallel rank(s); compute %s, reduce %s, "
            "reshard after forward %s", len(self.units), group_size(self.dp_cp_group),
            param_dtype or torch.float32, reduce_dtype, reshard_after_forward,
        )

    def forward(self, *inputs, **kwargs):
        return self.module(*inputs, **kwargs)

    def no_sync(self):
        """Grads are reduce-scattered every micro-batch (see the module docstring)."""
        return contextlib.nullcontext()

    def start_grad_sync(self, *unused) -> None:
        """The reduce-scatters run inside backward; nothing is left to start."""

    def finish_grad_sync(self) -> None:
        """FSDP's root post-backward waits for every reduce-scatter; nothing is left."""

    def zero_grad_buffer(self) -> None:
        """Grads live on the params (``optimizer.zero_grad`` drops them); no buffer to zero."""

    def scale_gradients(self, scaling_factor) -> None:
        """Multiply this rank's grad shards by ``scaling_factor`` (a float or 0-dim tensor);
        with per-token loss also by dp, undoing FSDP2's average (see ``__init__``)."""
        factor = scaling_factor * self._undo_average
        for param in self.module.parameters():
            if param.grad is not None:
                local_tensor(param.grad).mul_(factor)

    def state_dict(self, destination=None, prefix: str = "", keep_vars: bool = False):
        """The module's state dict, of DTensors (sharded over dp)."""
        return self.module.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)


def _saved_attributes(module: torch.nn.Module) -> dict:
    saved = {}
    for name, param in module.named_parameters():
        found = {a: getattr(param, a) for a in PARAM_SPLIT_ATTRIBUTES if hasattr(param, a)}
        if found:
            saved[name] = found
    return saved


def _restore_attributes(module: torch.nn.Module, saved: dict) -> None:
    """fully_shard replaces each param by a new DTensor param: give it the old attributes."""
    for name, param in module.named_parameters():
        for attribute, value in saved.get(name, {}).items():
            setattr(param, attribute, value)


def is_fully_sharded(model) -> bool:
    """True when ``model`` (a chunk or a list of chunks) is wrapped by FSDP2."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    return any(isinstance(chunk, TorchFullyShardedDataParallel) for chunk in chunks)
