"""Parallelism and precision settings shared by every core module."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class ModelParallelConfig:
    """How a model is split and in which precision it computes.

    Field names follow Megatron-Core; each docstring line is the matching flag's help.
    """

    tensor_model_parallel_size: int = 1
    """Degree of tensor model parallelism (--tensor-model-parallel-size)."""

    pipeline_model_parallel_size: int = 1
    """Degree of pipeline model parallelism (--pipeline-model-parallel-size)."""

    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Model chunks per pipeline rank for the interleaved schedule."""

    sequence_parallel: bool = False
    """Shard norm and dropout activations along the sequence over the tensor-parallel
    group (--sequence-parallel); needs tensor parallelism."""

    context_parallel_size: int = 1
    """Degree of context parallelism (--context-parallel-size)."""

    expert_model_parallel_size: int = 1
    """Degree of expert parallelism (--expert-model-parallel-size)."""

    expert_tensor_parallel_size: Optional[int] = None
    """Tensor parallelism inside experts; defaults to the tensor-parallel size."""

    perform_initialization: bool = True
    """Initialize weights at construction (off when a checkpoint will overwrite them)."""

    use_cpu_initialization: bool = False
    """Initialize full weights on the CPU with one generator, then take this rank's shard,
    so that the result does not depend on the tensor-parallel size (--use-cpu-initialization)."""

    fp16: bool = False
    """Compute in float16 (--fp16)."""

    bf16: bool = False
    """Compute in bfloat16 (--bf16)."""

    params_dtype: torch.dtype = torch.float32
    """Dtype of the model's parameters (float16/bfloat16 with --fp16/--bf16)."""

    pipeline_dtype: Optional[torch.dtype] = None
    """Dtype of the activations sent between pipeline stages (the params dtype when None)."""

    microbatch_group_size_per_vp_stage: Optional[int] = None
    """Number of contiguous micro-batches per virtual pipeline stage in the interleaved
    schedule (--microbatch-group-size-per-virtual-pipeline-stage); None means the
    pipeline-parallel size."""

    overlap_p2p_comm: bool = False
    """Interleaved pipeline: post each send/receive of activations or gradients without waiting
    and wait only before the next compute step of the same flow, so transfers run behind the
    other flow's compute (--overlap-p2p-communication, Megatron's default with VPP)."""

    batch_p2p_comm: bool = True
    """Megatron's switch between batched and single send/receive calls. Exchanges here are
    always posted as one batch; kept for compatibility, and it may not be set together with
    ``overlap_p2p_comm`` (Megatron's rule)."""

    deallocate_pipeline_outputs: bool = False
    """Free the data of a pipeline stage's output once it has been sent to the next stage
    (its autograd graph is kept for backward)."""

    gradient_accumulation_fusion: bool = False
    """Tensor-parallel linears add their weight gradient straight into ``param.main_grad``
    inside the GEMM (--no-gradient-accumulation-fusion turns it off; Megatron's default is on)."""

    tp_comm_overlap: bool = False
    """With sequence parallelism, decompose the tensor-parallel all-gather / reduce-scatter
    around the linears into ring steps overlapped with the GEMM of each sequence block
    (--tp-comm-overlap)."""

    def __post_init__(self) -> None:
        if self.fp16 and self.bf16:
            raise ValueError("--fp16 and --bf16 cannot both be set: choose one precision")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ValueError(
                "--sequence-parallel needs --tensor-model-parallel-size > 1 (it shards "
                "activations over the tensor-parallel group); drop --sequence-parallel"
            )
        if self.expert_tensor_parallel_size is None:
            self.expert_tensor_parallel_size = self.tensor_model_parallel_size
