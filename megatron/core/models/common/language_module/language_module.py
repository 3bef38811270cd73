"""Base class of language models: the LM loss and the tied embedding / output weight."""

from __future__ import annotations

from typing import Optional

import torch

from megatron.core import process_groups, tensor_parallel
from megatron.core.dist_checkpointing.state_dict_api import model_sharded_state_dict
from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
from megatron.core.transformer.transformer_config import TransformerConfig


class LanguageModule(torch.nn.Module):
    """Holds ``config`` and this rank's groups; subclasses build ``embedding`` (first
    pipeline stage) and ``output_layer`` (last stage)."""

    def __init__(self, config: TransformerConfig, pg_collection: Optional[process_groups.ProcessGroups] = None):
        super().__init__()
        self.config = config
        self.pg_collection = process_groups.resolve(pg_collection)
        self.tp_group = self.pg_collection.tp
        self.pre_process = True
        self.post_process = True
        self.share_embeddings_and_output_weights = False

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Per-token cross entropy: labels [b, s], logits [s, b, V/tp] -> loss [b, s].

        The softmax runs over the vocab shards of the tensor-parallel group (full logits
        are never gathered). With --cross-entropy-loss-fusion the loss is computed in
        chunks of tokens from the logits in their own dtype (fp32 math per chunk, no fp32
        copy of all logits; ``fusions/fused_cross_entropy.py``); otherwise logits are
        upcast to fp32 unless --fp16-lm-cross-entropy.
        """
        labels = labels.transpose(0, 1).contiguous()  # [s, b]
        if getattr(self.config, "cross_entropy_loss_fusion", False):
            loss = fused_vocab_parallel_cross_entropy(logits, labels, self.tp_group)
            return loss.transpose(0, 1).contiguous()
        if not getattr(self, "fp16_lm_cross_entropy", False):
            logits = logits.float()
        loss = tensor_parallel.vocab_parallel_cross_entropy(logits, labels, self.tp_group)
        return loss.transpose(0, 1).contiguous()

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """Megatron-Core's sharded state dict of this model (``dist_checkpointing.save``/``load``);
        ``sharded_offsets`` and ``metadata`` are accepted for its signature (keys here are
        already global)."""
        if sharded_offsets:
            raise ValueError("sharded_state_dict(sharded_offsets=...) is not supported; the keys here are already global")
        return model_sharded_state_dict(self, prefix, self.pg_collection)

    def shared_embedding_or_output_weight(self) -> Optional[torch.Tensor]:
        """The word-embedding weight on the first stage, else the output-layer weight."""
        if self.pre_process:
            return self.embedding.word_embeddings.weight
        if self.post_process:
            return self.output_layer.weight
        return None

    def setup_embeddings_and_output_layer(self) -> None:
        """Mark tied weights with ``shared_embedding`` / ``shared`` for the pipeline code.

        On a last stage without the embedding, the output weight stands in for the word
        embedding: it starts at zero and the pipeline code must copy (all-reduce) the
        first stage's embedding into it over the embedding group before training.
        """
        if not self.share_embeddings_and_output_weights:
            return
        if self.pre_process:
            weight = self.embedding.word_embeddings.weight
            weight.shared_embedding = True
        if self.post_process and not self.pre_process:
            weight = self.output_layer.weight
            with torch.no_grad():
                weight.zero_()
            weight.shared = True
            weight.shared_embedding = True
