"""Base class of language models: the seam every family (GPT, BERT, Mamba) plugs into.

A family's model is ``embedding`` (first pipeline stage) -> its transformer stack ->
``output_layer`` (last stage). This class holds what is the same for all of them: the
stage role and output settings, building the embedding and the output layer, handing the
previous stage's activation to the stack, the logits-or-loss plumbing after the output
layer, the LM loss and the tied embedding / output weight. A family adds its stack, its
heads and its forward."""

from __future__ import annotations

from typing import Optional

import torch

from megatron.core import process_groups, tensor_parallel
from megatron.core.dist_checkpointing.state_dict_api import model_sharded_state_dict
from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.transformer.context_parallel import get_pos_emb_on_this_cp_rank
from megatron.core.transformer.init_rng import initialization_stream
from megatron.core.transformer.transformer_config import TransformerConfig


class LanguageModule(torch.nn.Module):
    """Holds ``config`` and this rank's groups; subclasses call ``_init_language_model``,
    build ``embedding`` (first pipeline stage, ``_build_embedding``), their stack under the
    attribute named by ``stack_attribute``, and ``output_layer`` (last stage,
    ``_build_output_layer``)."""

    # The attribute holding the transformer stack the previous stage's activation goes to.
    stack_attribute = "decoder"
    # Whether every pipeline stage (not only the first and the last) reads the micro-batch;
    # the training loop then gives each of a rank's model chunks its own view of the data.
    every_stage_reads_data = False
    # Whether Megatron-LM's checkpoints of this family name the norms as Transformer Engine
    # does (fused into the next linear) even in its per-rank torch files.
    megatron_te_norm_names = False
    # Whether Megatron-LM's torch_dist checkpoints of this family hold the output layer's
    # (empty) ``_extra_state`` entry; its GPTModel drops it.
    megatron_output_extra_state = True

    def __init__(self, config: TransformerConfig, pg_collection: Optional[process_groups.ProcessGroups] = None):
        super().__init__()
        self.config = config
        self.pg_collection = process_groups.resolve(pg_collection)
        self.tp_group = self.pg_collection.tp
        self.pre_process = True
        self.post_process = True
        self.share_embeddings_and_output_weights = False

    def _init_language_model(
        self,
        *,
        vocab_size: int,
        max_sequence_length: int,
        pre_process: bool,
        post_process: bool,
        fp16_lm_cross_entropy: bool,
        parallel_output: bool,
        share_embeddings_and_output_weights: bool,
        position_embedding_type: str,
    ) -> None:
        """Check the vocabulary and keep the settings every family's constructor takes."""
        if vocab_size <= 0:
            raise ValueError(f"{type(self).__name__} needs vocab_size > 0 (the padded vocabulary), got {vocab_size}")
        self.vocab_size = vocab_size
        self.max_sequence_length = max_sequence_length
        self.pre_process = pre_process
        self.post_process = post_process
        self.fp16_lm_cross_entropy = fp16_lm_cross_entropy
        self.parallel_output = parallel_output
        self.share_embeddings_and_output_weights = share_embeddings_and_output_weights
        self.position_embedding_type = position_embedding_type

    def _build_embedding(self, num_tokentypes: int = 0) -> None:
        """The word (and position, token-type) embedding of the first stage."""
        with initialization_stream("embedding"):
            self.embedding = LanguageModelEmbedding(
                self.config, self.vocab_size, self.max_sequence_length, self.position_embedding_type,
                num_tokentypes=num_tokentypes, pg_collection=self.pg_collection,
            )

    def _build_output_layer(self, *, bias: bool) -> None:
        """The vocab-parallel output layer of the last stage; with tied weights on a stage
        that also holds the embedding it has no weight of its own (forward passes it)."""
        config = self.config
        with initialization_stream("output_layer"):
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size,
                self.vocab_size,
                config=config,
                init_method=config.init_method,
                bias=bias,
                skip_bias_add=False,
                gather_output=False,
                skip_weight_param_allocation=self.pre_process and self.share_embeddings_and_output_weights,
                tp_group=self.tp_group,
            )

    def _rotary_freqs(self, decoder_input: Optional[torch.Tensor], inference_context=None):
        """Rotary angles of the positions the stack holds (None without RoPE); a family with
        --position-embedding-type rope builds ``rotary_pos_emb``."""
        if self.position_embedding_type != "rope":
            return None
        reference = decoder_input if decoder_input is not None else getattr(self, self.stack_attribute).input_tensor
        seq_len = reference.size(0)
        if inference_context is not None:
            # Generation feeds the tokens after the cached ones: the context knows their positions.
            return inference_context.rotary_freqs(self.rotary_pos_emb, seq_len, reference.device)
        if self.config.sequence_parallel:
            # Activations hold s/tp positions here; attention sees the whole sequence.
            seq_len *= process_groups.group_size(self.tp_group)
        cp_group = self.pg_collection.cp
        # Context parallelism: this rank holds chunks of the whole sequence; rotate by
        # their global positions.
        seq_len *= process_groups.group_size(cp_group)
        freqs = self.rotary_pos_emb(seq_len, device=reference.device)
        return get_pos_emb_on_this_cp_rank(freqs, 0, cp_group)

    def set_input_tensor(self, input_tensor) -> None:
        """Give the stack the activation from the previous pipeline stage ([s(/tp), b, h]
        or a one-element list of it)."""
        if isinstance(input_tensor, (list, tuple)):
            if len(input_tensor) != 1:
                raise ValueError(f"{type(self).__name__} takes one input tensor per stage, got {len(input_tensor)}")
            input_tensor = input_tensor[0]
        getattr(self, self.stack_attribute).set_input_tensor(input_tensor)

    def _logits_or_loss(self, hidden_states: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        """hidden_states [s, b, h] through the output layer: the per-token loss [b, s] (fp32)
        with labels [b, s], else the logits [b, s, V/tp] (full V when not parallel_output)."""
        output_weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(hidden_states, weight=output_weight)  # [s, b, V/tp]
        if labels is not None:
            return self.compute_language_model_loss(labels, logits)
        if not self.parallel_output:
            logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits, self.tp_group)
        return logits.transpose(0, 1).contiguous()

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
