"""Tensor-parallel layers: column- and row-parallel linears, vocab-parallel embedding.

Shapes are sequence first: activations [s, b, h] (with sequence parallelism, [s/tp, b, h]
outside the tensor-parallel region). Weights follow ``torch.nn.functional.linear``'s
[out, in] layout; a column-parallel weight holds rows [r*out/tp, (r+1)*out/tp) of the full
weight, a row-parallel weight holds columns [r*in/tp, (r+1)*in/tp).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.nn.parameter import Parameter

from megatron.core import process_groups
import megatron.core.fp8.linear as fp8_linear  # a module reference: fp8.linear imports tensor_parallel too
from megatron.core.fp8.gemm import select_backend
from megatron.core.fp8.layer_scope import new_linear_scaling
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.process_groups import group_rank, group_size
from megatron.core.tensor_parallel.linear_with_comm import column_parallel_matmul, row_parallel_matmul
from megatron.core.tensor_parallel.mappings import (
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron.core.tensor_parallel.partition import VocabUtility, divide, strided_shard
from megatron.core.tensor_parallel.random import (
    get_cuda_rng_tracker,
    get_expert_parallel_rng_tracker_name,
    get_model_parallel_rng_tracker_name,
)

_MODEL_PARALLEL_ATTRIBUTE_DEFAULTS = {"tensor_model_parallel": False, "partition_dim": -1, "partition_stride": 1}


def param_is_not_tensor_parallel_duplicate(param: torch.Tensor, tp_group=None) -> bool:
    """True for a tensor-parallel shard, or for a replicated parameter on tp rank 0.

    Use it to count each parameter once (norms, parameter counts). ``tp_group=None``
    means no tensor parallelism (every parameter counts).
    """
    return bool(getattr(param, "tensor_model_parallel", False)) or group_rank(tp_group) == 0


def set_tensor_model_parallel_attributes(tensor: torch.Tensor, is_parallel: bool, dim: int, stride: int) -> None:
    """Mark ``tensor`` as split (or not) along ``dim`` with ``stride`` interleaved sub-weights."""
    for attribute in _MODEL_PARALLEL_ATTRIBUTE_DEFAULTS:
        if hasattr(tensor, attribute):
            raise RuntimeError(f"tensor already has the tensor-parallel attribute {attribute!r}")
    setattr(tensor, "tensor_model_parallel", is_parallel)
    setattr(tensor, "partition_dim", dim)
    setattr(tensor, "partition_stride", stride)


def set_defaults_if_not_set_tensor_model_parallel_attributes(tensor: torch.Tensor) -> None:
    """Give ``tensor`` the 'replicated' attributes where it has none."""
    for attribute, value in _MODEL_PARALLEL_ATTRIBUTE_DEFAULTS.items():
        if not hasattr(tensor, attribute):
            setattr(tensor, attribute, value)


def copy_tensor_model_parallel_attributes(destination_tensor: torch.Tensor, source_tensor: torch.Tensor) -> None:
    """Copy the tensor-parallel attributes of ``source_tensor`` (e.g. to an fp32 main copy)."""
    for attribute in _MODEL_PARALLEL_ATTRIBUTE_DEFAULTS:
        if hasattr(source_tensor, attribute):
            setattr(destination_tensor, attribute, getattr(source_tensor, attribute))


def _param_device(config: ModelParallelConfig) -> torch.device:
    if torch.get_default_device().type == "meta":
        # Built under ``with torch.device("meta")`` to count and plan (the dry run): shapes only.
        return torch.device("meta")
    if torch.cuda.is_available() and not config.use_cpu_initialization:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _initialize_affine_weight_cpu(
    weight: torch.Tensor,
    output_size: int,
    input_size: int,
    per_partition_size: int,
    partition_dim: int,
    init_method: Callable,
    stride: int = 1,
    return_master_weight: bool = False,
    *,
    params_dtype: torch.dtype = torch.float32,
    rank: int = 0,
    world_size: int = 1,
) -> Optional[torch.Tensor]:
    """Initialize the full [output_size, input_size] weight in fp32 with the default CPU
    generator, copy this rank's (strided) shard into ``weight`` (cast to ``params_dtype``).

    The full weight depends only on the seed, so every tensor-parallel size gets the same
    model. Returns the full fp32 weight when ``return_master_weight``.
    """
    master = torch.empty(output_size, input_size, dtype=torch.float32)
    init_method(master)
    shard = strided_shard(master, partition_dim, rank, world_size, stride)
    if shard.size(partition_dim) != per_partition_size:
        raise RuntimeError(f"shard has {shard.size(partition_dim)} rows, expected {per_partition_size}")
    with torch.no_grad():
        weight.copy_(shard.to(dtype=params_dtype))
    return master if return_master_weight else None


def _initialize_affine_weight_gpu(weight: torch.Tensor, init_method: Callable, is_expert: bool = False) -> None:
    """Initialize only the local shard in place, drawing from the tracker's tensor-parallel
    (or expert) stream so that shards differ across ranks. Works on CPU tensors too."""
    name = get_expert_parallel_rng_tracker_name() if is_expert else get_model_parallel_rng_tracker_name()
    with get_cuda_rng_tracker().fork(name):
        init_method(weight)


def _new_weight(
    shape: Tuple[int, int],
    full_shape: Tuple[int, int],
    partition_dim: int,
    stride: int,
    config: ModelParallelConfig,
    init_method: Callable,
    tp_group,
    *,
    is_expert: bool,
    keep_master: bool,
) -> Tuple[Parameter, Optional[torch.Tensor]]:
    """A tensor-parallel weight shard of ``shape``, initialized as the config asks."""
    weight = Parameter(torch.empty(shape, device=_param_device(config), dtype=config.params_dtype))
    master = None
    if config.perform_initialization:
        if config.use_cpu_initialization:
            master = _initialize_affine_weight_cpu(
                weight, full_shape[0], full_shape[1], shape[partition_dim], partition_dim, init_method,
                stride, keep_master, params_dtype=config.params_dtype,
                rank=group_rank(tp_group), world_size=group_size(tp_group),
            )
        else:
            _initialize_affine_weight_gpu(weight, init_method, is_expert)
    set_tensor_model_parallel_attributes(weight, True, partition_dim, stride)
    return weight, master


def _resolve_tp_group(tp_group, is_expert: bool):
    """The group to split over: given, else the default's tp (expt_tp for experts)."""
    if tp_group is not None:
        return tp_group
    groups = process_groups.resolve(None)
    return groups.expt_tp if is_expert else groups.tp


def _uses_explicit_expert_comm(config: ModelParallelConfig, is_expert: bool) -> bool:
    """Experts under EP or TP get their communication from the token dispatcher instead."""
    return is_expert and (config.tensor_model_parallel_size > 1 or config.expert_model_parallel_size > 1)


class ColumnParallelLinear(torch.nn.Module):
    """Y = X A^T + b with A split by rows (output features) over the tensor-parallel group.

    input [s, b, in] (or [s/tp, b, in] with ``config.sequence_parallel``, all-gathered along
    the sequence before the matmul; backward reduce-scatters the input gradient);
    output [s, b, out/tp], or [s, b, out] with ``gather_output``. ``forward`` returns
    ``(output, bias)`` where bias is the (unadded) bias with ``skip_bias_add``, else None.
    ``stride`` > 1 declares ``stride`` interleaved sub-weights (fused [gate; up] fc1), each
    split over the ranks. ``tp_comm_buffer_name`` is accepted for Megatron-Core
    compatibility (a Transformer Engine knob) and ignored.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: ModelParallelConfig,
        init_method: Callable,
        bias: bool = True,
        gather_output: bool = False,
        stride: int = 1,
        keep_master_weight_for_test: bool = False,
        skip_bias_add: bool = False,
        skip_weight_param_allocation: bool = False,
        is_expert: bool = False,
        tp_comm_buffer_name: Optional[str] = None,
        tp_group=None,
    ) -> None:
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.gather_output, self.skip_bias_add, self.is_expert = gather_output, skip_bias_add, is_expert
        self.config = config
        self.tp_group = _resolve_tp_group(tp_group, is_expert)
        world_size = group_size(self.tp_group)
        self.output_size_per_partition = divide(
            output_size, world_size, "ColumnParallelLinear output size", "use a --tensor-model-parallel-size that divides it"
        )
        self.explicit_expert_comm = _uses_explicit_expert_comm(config, is_expert)
        self.sequence_parallel = config.sequence_parallel and world_size > 1
        if config.sequence_parallel and gather_output and not self.explicit_expert_comm:
            raise ValueError(
                "ColumnParallelLinear(gather_output=True) cannot be used with --sequence-parallel: "
                "the output would be gathered along both sequence and hidden; use gather_output=False"
            )
        self.master_weight = None
        if skip_weight_param_allocation:
            self.weight = None
        else:
            self.weight, self.master_weight = _new_weight(
                (self.output_size_per_partition, input_size), (output_size, input_size), 0, stride,
                config, init_method, self.tp_group, is_expert=is_expert, keep_master=keep_master_weight_for_test,
            )
            setattr(self.weight, "allreduce", not (is_expert and config.expert_model_parallel_size > 1))
        if bias:
            self.bias = Parameter(
                torch.zeros(self.output_size_per_partition, device=_param_device(config), dtype=config.params_dtype)
            )
            set_tensor_model_parallel_attributes(self.bias, True, 0, stride)
            setattr(self.bias, "allreduce", not (is_expert and config.expert_model_parallel_size > 1))
        else:
            self.register_parameter("bias", None)
        # FP8 scaling state inside an FP8 transformer layer (megatron.core.fp8), else None
        self.fp8 = new_linear_scaling(_param_device(config))

    def _check_weight(self, weight: Optional[torch.Tensor]) -> torch.Tensor:
        if weight is None:
            if self.weight is None:
                raise RuntimeError(
                    "ColumnParallelLinear was built with skip_weight_param_allocation=True: pass "
                    "the weight to forward(input_, weight=...)"
                )
            return self.weight
        expected = (self.output_size_per_partition, self.input_size)
        if tuple(weight.shape) != expected:
            raise RuntimeError(
                f"ColumnParallelLinear got a weight of shape {tuple(weight.shape)}, expected {expected} "
                "(this rank's rows of the [output_size, input_size] weight)"
            )
        return weight

    def forward(
        self, input_: torch.Tensor, weight: Optional[torch.Tensor] = None, runtime_gather_output: Optional[bool] = None
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        weight = self._check_weight(weight)
        bias = None if self.skip_bias_add else self.bias
        if self.explicit_expert_comm:
            output_parallel = F.linear(input_, weight, bias)
        elif self.fp8 is not None:
            output_parallel = fp8_linear.fp8_column_parallel(
                input_, weight, bias, self.fp8, self.tp_group, amax_group=self.fp8.amax_group,
                sequence_parallel=self.sequence_parallel,
                fuse_accumulation=self.config.gradient_accumulation_fusion and weight is self.weight,
                backend=select_backend(weight.device, self.fp8.recipe.emulation),
            )
        else:
            # the accumulation fusion only for the layer's own weight: a weight passed in (the
            # tied output layer) also gets the embedding lookup's gradient through .grad
            output_parallel = column_parallel_matmul(
                input_, weight, bias, self.tp_group,
                sequence_parallel=self.sequence_parallel,
                tp_comm_overlap=self.config.tp_comm_overlap,
                fuse_accumulation=self.config.gradient_accumulation_fusion and weight is self.weight,
            )
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        if gather and not self.explicit_expert_comm:
            output = gather_from_tensor_model_parallel_region(output_parallel, self.tp_group)
        else:
            output = output_parallel
        return output, (self.bias if self.skip_bias_add else None)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.input_size}, out_features={self.output_size}, "
            f"per_partition={self.output_size_per_partition}, bias={self.bias is not None}, "
            f"gather_output={self.gather_output}, sequence_parallel={self.sequence_parallel}"
        )


class RowParallelLinear(torch.nn.Module):
    """Y = X A^T + b with A split by columns (input features) over the tensor-parallel group.

    input [s, b, in/tp] when ``input_is_parallel`` (else [s, b, in], split here); the
    partial products are all-reduced to [s, b, out], or reduce-scattered along the sequence
    to [s/tp, b, out] with ``config.sequence_parallel``. The bias is added once, after the
    reduction; with sequence parallelism it is marked ``sequence_parallel = True`` because
    each rank's bias gradient covers only its sequence block and must be all-reduced over
    tensor-parallel ranks. ``forward`` returns ``(output, bias-or-None)`` as the column layer.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: ModelParallelConfig,
        init_method: Callable,
        bias: bool,
        input_is_parallel: bool,
        skip_bias_add: bool,
        stride: int = 1,
        keep_master_weight_for_test: bool = False,
        is_expert: bool = False,
        tp_comm_buffer_name: Optional[str] = None,
        tp_group=None,
    ) -> None:
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.input_is_parallel, self.skip_bias_add, self.is_expert = input_is_parallel, skip_bias_add, is_expert
        self.config = config
        self.tp_group = _resolve_tp_group(tp_group, is_expert)
        world_size = group_size(self.tp_group)
        self.input_size_per_partition = divide(
            input_size, world_size, "RowParallelLinear input size", "use a --tensor-model-parallel-size that divides it"
        )
        self.explicit_expert_comm = _uses_explicit_expert_comm(config, is_expert)
        self.sequence_parallel = config.sequence_parallel and world_size > 1
        if config.sequence_parallel and not input_is_parallel and not self.explicit_expert_comm:
            raise ValueError(
                "RowParallelLinear(input_is_parallel=False) cannot be used with --sequence-parallel: "
                "its input must already be split over tensor-parallel ranks; pass input_is_parallel=True"
            )
        self.weight, self.master_weight = _new_weight(
            (output_size, self.input_size_per_partition), (output_size, input_size), 1, stride,
            config, init_method, self.tp_group, is_expert=is_expert, keep_master=keep_master_weight_for_test,
        )
        setattr(self.weight, "allreduce", not (is_expert and config.expert_model_parallel_size > 1))
        if bias:
            self.bias = Parameter(torch.zeros(output_size, device=_param_device(config), dtype=config.params_dtype))
            setattr(self.bias, "sequence_parallel", self.sequence_parallel)
            setattr(self.bias, "allreduce", not (is_expert and config.expert_model_parallel_size > 1))
        else:
            self.register_parameter("bias", None)
        # FP8 scaling state inside an FP8 transformer layer (megatron.core.fp8), else None
        self.fp8 = new_linear_scaling(_param_device(config))

    def forward(self, input_: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.input_is_parallel:
            input_parallel = input_
        else:
            input_parallel = scatter_to_tensor_model_parallel_region(input_, self.tp_group)
        fuse = self.config.gradient_accumulation_fusion and not self.explicit_expert_comm
        ring = self.sequence_parallel and self.config.tp_comm_overlap and not self.explicit_expert_comm
        if self.fp8 is not None:
            ring = False  # the FP8 partial products are reduced by the plain mappings below
            output_parallel = fp8_linear.fp8_row_parallel(
                input_parallel, self.weight, self.fp8, self.tp_group, amax_group=self.fp8.amax_group,
                fuse_accumulation=fuse,
                backend=select_backend(self.weight.device, self.fp8.recipe.emulation),
            )
        else:
            output_parallel = row_parallel_matmul(
                input_parallel, self.weight, self.tp_group, reduce_scatter_by_ring=ring, fuse_accumulation=fuse
            )
        if self.explicit_expert_comm or ring:
            output = output_parallel
        elif self.sequence_parallel:
            output = reduce_scatter_to_sequence_parallel_region(output_parallel, self.tp_group)
        else:
            output = reduce_from_tensor_model_parallel_region(output_parallel, self.tp_group)
        if self.skip_bias_add or self.bias is None:
            return output, (self.bias if self.skip_bias_add else None)
        return output + self.bias, None

    def extra_repr(self) -> str:
        return (
            f"in_features={self.input_size}, out_features={self.output_size}, "
            f"per_partition={self.input_size_per_partition}, bias={self.bias is not None}, "
            f"input_is_parallel={self.input_is_parallel}, sequence_parallel={self.sequence_parallel}"
        )


class VocabParallelEmbedding(torch.nn.Module):
    """Embedding table split along the vocabulary: rank r holds ids [r*V/tp, (r+1)*V/tp).

    input: token ids [b, s] (global ids). Ids outside this rank's range look up row 0 and
    are zeroed, then the partial embeddings are all-reduced: output [b, s, h]. With
    ``reduce_scatter_embeddings`` the output is transposed to [s, b, h] and reduce-scattered
    along the sequence instead, giving [s/tp, b, h] for sequence parallelism.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        init_method: Callable,
        reduce_scatter_embeddings: bool = False,
        config: ModelParallelConfig,
        tp_group=None,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.reduce_scatter_embeddings = reduce_scatter_embeddings
        self.tp_group = _resolve_tp_group(tp_group, False)
        rank, world_size = group_rank(self.tp_group), group_size(self.tp_group)
        self.vocab_start_index, self.vocab_end_index = VocabUtility.vocab_range_from_global_vocab_size(
            num_embeddings, rank, world_size
        )
        self.num_embeddings_per_partition = self.vocab_end_index - self.vocab_start_index
        self.weight, _ = _new_weight(
            (self.num_embeddings_per_partition, embedding_dim), (num_embeddings, embedding_dim), 0, 1,
            config, init_method, self.tp_group, is_expert=False, keep_master=False,
        )

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        if group_size(self.tp_group) > 1:
            input_mask = (input_ < self.vocab_start_index) | (input_ >= self.vocab_end_index)
            masked_input = (input_ - self.vocab_start_index).masked_fill(input_mask, 0)
            output_parallel = F.embedding(masked_input, self.weight)
            # embedding's backward does not need its output, so zeroing in place is safe
            output_parallel.masked_fill_(input_mask.unsqueeze(-1), 0.0)
        else:
            output_parallel = F.embedding(input_, self.weight)
        if self.reduce_scatter_embeddings:
            output_parallel = output_parallel.transpose(0, 1).contiguous()
            return reduce_scatter_to_sequence_parallel_region(output_parallel, self.tp_group)
        return reduce_from_tensor_model_parallel_region(output_parallel, self.tp_group)

    def extra_repr(self) -> str:
        return (
            f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
            f"vocab_range=[{self.vocab_start_index}, {self.vocab_end_index})"
        )
