"""How a tensor or a vocabulary is cut into tensor-parallel partitions."""

from __future__ import annotations

from typing import Sequence, Tuple

import torch

# Attributes the parallel layers set on a parameter to say how it is split or shared; grad
# statistics, the optimizers' param groups and finalize_model_grads read them, so a copy of
# a parameter (an fp32 main copy, an FSDP2 DTensor) must carry them too.
PARAM_SPLIT_ATTRIBUTES = (
    "tensor_model_parallel",
    "partition_dim",
    "partition_stride",
    "shared",
    "shared_embedding",
    "sequence_parallel",
    "allreduce",
    "is_embedding_or_output_parameter",
)


def divide(numerator: int, denominator: int, what: str = "size", fix: str = "") -> int:
    """``numerator // denominator``; ValueError naming ``what`` (and ``fix``) when it does not divide."""
    if denominator <= 0 or numerator % denominator:
        raise ValueError(
            f"{what} {numerator} is not divisible by {denominator}: tensor parallelism splits it "
            f"into equal parts; {fix or 'choose sizes that divide'}"
        )
    return numerator // denominator


def split_tensor_along_last_dim(
    tensor: torch.Tensor, num_partitions: int, contiguous_split_chunks: bool = False
) -> Sequence[torch.Tensor]:
    """Split ``tensor`` into ``num_partitions`` equal chunks along its last dimension.

    Returns views unless ``contiguous_split_chunks`` (then each chunk is made contiguous).
    """
    last_dim_size = divide(tensor.size(-1), num_partitions, "last dimension")
    chunks = torch.split(tensor, last_dim_size, dim=-1)
    if contiguous_split_chunks:
        return tuple(chunk.contiguous() for chunk in chunks)
    return chunks


def split_tensor_along_first_dim(tensor: torch.Tensor, num_partitions: int, rank: int) -> torch.Tensor:
    """Block ``rank`` of ``num_partitions`` equal blocks of dim 0, contiguous."""
    block = divide(
        tensor.size(0),
        num_partitions,
        "first dimension (sequence length)",
        "with --sequence-parallel use a --seq-length that is a multiple of --tensor-model-parallel-size",
    )
    return tensor[rank * block : (rank + 1) * block].contiguous()


def strided_shard(full: torch.Tensor, dim: int, rank: int, world_size: int, stride: int = 1) -> torch.Tensor:
    """This rank's part of a full weight split along ``dim`` for ``world_size`` ranks.

    With ``stride`` s, ``full`` is seen as s interleaved sub-weights (e.g. a fused [gate; up]
    fc1 has s=2): it is cut into ``world_size * s`` equal blocks and rank r keeps blocks
    r, r + world_size, r + 2*world_size, ..., so every rank holds 1/world_size of each.
    """
    per_partition = divide(full.size(dim), world_size, f"dimension {dim} of the weight")
    per_stride = divide(per_partition, stride, "partition size (per stride)")
    blocks = torch.split(full, per_stride, dim=dim)
    return torch.cat(blocks[rank::world_size], dim=dim)


class VocabUtility:
    """Contiguous vocabulary ranges: rank r holds ids [first, last) of the padded vocab."""

    @staticmethod
    def vocab_range_from_per_partition_vocab_size(
        per_partition_vocab_size: int, rank: int, world_size: int
    ) -> Tuple[int, int]:
        first = rank * per_partition_vocab_size
        return first, first + per_partition_vocab_size

    @staticmethod
    def vocab_range_from_global_vocab_size(global_vocab_size: int, rank: int, world_size: int) -> Tuple[int, int]:
        per_partition = divide(
            global_vocab_size,
            world_size,
            "vocabulary size",
            "pad the vocabulary (--make-vocab-size-divisible-by) to a multiple of "
            "--tensor-model-parallel-size",
        )
        return VocabUtility.vocab_range_from_per_partition_vocab_size(per_partition, rank, world_size)
