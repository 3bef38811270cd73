"""Token (+ learned position, + optional token-type) embedding of a language model."""

from __future__ import annotations

from typing import Optional

import torch

from megatron.core import process_groups, tensor_parallel
from megatron.core.transformer.transformer_config import TransformerConfig

_POSITION_TYPES = ("learned_absolute", "rope", "none")


class LanguageModelEmbedding(torch.nn.Module):
    """Word embeddings (vocab-parallel), learned absolute positions, dropout.

    forward(input_ids [b, s], position_ids [b, s] or None, tokentype_ids [b, s] or None)
    -> [s, b, h], or [s/tp, b, h] under sequence parallelism (scattered over the
    tensor-parallel group after the sum). ``position_embedding_type`` 'rope' or 'none'
    adds no positions here (rope is applied inside attention).
    """

    def __init__(
        self,
        config: TransformerConfig,
        vocab_size: int,
        max_sequence_length: int,
        position_embedding_type: str = "learned_absolute",
        num_tokentypes: int = 0,
        scatter_to_sequence_parallel: bool = True,
        pg_collection: Optional[process_groups.ProcessGroups] = None,
    ):
        super().__init__()
        if position_embedding_type not in _POSITION_TYPES:
            raise ValueError(
                f"--position-embedding-type {position_embedding_type!r} is not supported by "
                f"LanguageModelEmbedding: use one of {', '.join(_POSITION_TYPES)}"
            )
        self.config = config
        self.vocab_size = vocab_size
        self.max_sequence_length = max_sequence_length
        self.position_embedding_type = position_embedding_type
        self.add_position_embedding = position_embedding_type == "learned_absolute"
        self.num_tokentypes = num_tokentypes
        self.tp_group = process_groups.resolve(pg_collection).tp
        self.scatter_to_sequence_parallel = scatter_to_sequence_parallel and config.sequence_parallel

        self.word_embeddings = tensor_parallel.VocabParallelEmbedding(
            num_embeddings=vocab_size,
            embedding_dim=config.hidden_size,
            init_method=config.embedding_init_method,
            config=config,
            tp_group=self.tp_group,
        )
        if self.add_position_embedding:
            self.position_embeddings = torch.nn.Embedding(
                max_sequence_length, config.hidden_size, dtype=config.params_dtype
            )
            if config.perform_initialization:
                with torch.no_grad():
                    config.embedding_init_method(self.position_embeddings.weight)
        if num_tokentypes > 0:
            self.tokentype_embeddings = torch.nn.Embedding(num_tokentypes, config.hidden_size, dtype=config.params_dtype)
            if config.perform_initialization:
                with torch.no_grad():
                    config.embedding_init_method(self.tokentype_embeddings.weight)
        else:
            self.tokentype_embeddings = None
        self.embedding_dropout = torch.nn.Dropout(config.hidden_dropout)

    def zero_parameters(self) -> None:
        """Zero every embedding weight (used by tests and by tied-weight setup)."""
        with torch.no_grad():
            for param in self.parameters():
                param.zero_()

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        tokentype_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        embeddings = self.word_embeddings(input_ids)  # [b, s, h]
        if self.add_position_embedding:
            if position_ids is None:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
            embeddings = embeddings + self.position_embeddings(position_ids)
        if self.tokentype_embeddings is not None:
            if tokentype_ids is None:
                raise ValueError("this embedding has token types (num_tokentypes > 0): pass tokentype_ids [b, s]")
            embeddings = embeddings + self.tokentype_embeddings(tokentype_ids)
        embeddings = embeddings.transpose(0, 1).contiguous()  # [s, b, h]
        if self.config.fp32_residual_connection:
            embeddings = embeddings.float()
        if self.scatter_to_sequence_parallel:
            embeddings = tensor_parallel.scatter_to_sequence_parallel_region(embeddings, self.tp_group)
            # Each rank now holds a different slice of the sequence, so its dropout mask
            # must come from the tensor-parallel RNG stream, which differs per rank.
            if self.embedding_dropout.p > 0 and self.training:
                with tensor_parallel.get_cuda_rng_tracker().fork():
                    return self.embedding_dropout(embeddings)
            return embeddings
        return self.embedding_dropout(embeddings)
