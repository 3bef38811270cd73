"""BertModel: embedding (with token types) -> bidirectional TransformerBlock -> LM head
(dense + GeLU + norm, output layer tied to the word embeddings with its own bias) and,
optionally, a pooler over [CLS] feeding the binary (NSP / sentence-order) head.

Parameter names follow Megatron-Core's local BERT spec (``encoder.*``, ``lm_head.dense``,
``lm_head.layer_norm``, ``pooler.dense``, ``binary_head``), so checkpoints map one to one;
the post-norm variant (``transformer_block_type='post_ln'``) uses NeMo's names
(``encoder.initial_layernorm``, ``post_att_layernorm``, ``post_mlp_layernorm``).
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron.core import process_groups, tensor_parallel
from megatron.core.models.bert import masked_positions
from megatron.core.models.bert.bert_lm_head import BertLMHead
from megatron.core.models.bert.pooler import Pooler
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.transformer.init_rng import initialization_stream
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig


def bert_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[b, s] with 1 for real tokens, 0 for padding -> bool [b, 1, 1, s], True = masked key.

    Only keys are masked: every query, padded or not, attends to the real tokens. Real
    tokens see exactly what Megatron's [b, 1, s, s] mask shows them; padded positions get
    a finite output (instead of a softmax over nothing) that the loss mask ignores.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"BertModel takes a [b, s] padding mask (1 = token, 0 = padding), got {tuple(attention_mask.shape)}")
    return (attention_mask < 0.5).unsqueeze(1).unsqueeze(1)


class BertModel(LanguageModule):
    """Encoder-only masked language model (one pipeline stage of it when pre/post_process
    are not both set).

    forward(input_ids [b, s], attention_mask [b, s] (1 = token, 0 = padding),
    tokentype_ids [b, s] or None, lm_labels [b, s] or None):
      - not post_process: the hidden states [s(/tp), b, h] for the next stage;
      - else (lm, binary_logits): lm is the per-token loss [b, s] (fp32) with lm_labels,
        else the logits [b, s, V/tp] (full V when parallel_output=False); binary_logits
        [b, 2], or None without the binary head.

    ``num_tokentypes`` is 2 with the binary head and 0 without it in Megatron's script.
    ``add_lm_head=False`` / ``add_pooler`` (default: ``add_binary_head``) build the heads of
    Hugging Face's ``BertModel`` (pooler, no LM head) or ``BertForMaskedLM`` (LM head only).
    ``return_embeddings`` makes forward return the last hidden states [b, s, h] instead
    (the post-norm stack's output, or the final norm's); forward's own ``return_embeddings``
    overrides it for one call. With lm_labels, ``loss_mask`` [b, s] and
    ``max_masked_positions`` (at least the masked positions of any sequence), the LM head
    runs on those positions only and the loss is zero elsewhere (``masked_positions.py``).
    """

    stack_attribute = "encoder"
    every_stage_reads_data = True  # every stage's attention needs the padding mask

    def __init__(
        self,
        config: TransformerConfig,
        num_tokentypes: int = 0,
        transformer_layer_spec=None,
        vocab_size: int = 0,
        max_sequence_length: int = 0,
        pre_process: bool = True,
        post_process: bool = True,
        fp16_lm_cross_entropy: bool = False,
        parallel_output: bool = True,
        share_embeddings_and_output_weights: bool = True,
        position_embedding_type: str = "learned_absolute",
        add_binary_head: bool = True,
        add_lm_head: bool = True,
        add_pooler: Optional[bool] = None,
        return_embeddings: bool = False,
        pg_collection: Optional[process_groups.ProcessGroups] = None,
        vp_stage: Optional[int] = None,
    ):
        super().__init__(config, pg_collection=pg_collection)
        self._init_language_model(
            vocab_size=vocab_size, max_sequence_length=max_sequence_length, pre_process=pre_process,
            post_process=post_process, fp16_lm_cross_entropy=fp16_lm_cross_entropy, parallel_output=parallel_output,
            share_embeddings_and_output_weights=share_embeddings_and_output_weights and add_lm_head,
            position_embedding_type=position_embedding_type,
        )
        if position_embedding_type != "learned_absolute" or max_sequence_length <= 0:
            raise ValueError(
                "BertModel uses learned absolute positions: --position-embedding-type must be learned_absolute "
                f"(got {position_embedding_type!r}) and --max-position-embeddings > 0 (got {max_sequence_length})"
            )
        if process_groups.group_size(self.pg_collection.cp) > 1:
            raise ValueError(
                "BERT does not support --context-parallel-size > 1 (its padding mask is not split over "
                "context-parallel ranks): use --context-parallel-size 1"
            )
        self.transformer_layer_spec = transformer_layer_spec
        self.add_binary_head = add_binary_head
        self.add_lm_head = add_lm_head
        self.add_pooler = add_binary_head if add_pooler is None else add_pooler
        if add_binary_head and not self.add_pooler:
            raise ValueError("BertModel's binary head reads the pooler: add_binary_head needs add_pooler")
        self.return_embeddings = return_embeddings
        self.vp_stage = vp_stage
        if pre_process:
            self._build_embedding(num_tokentypes)
        self.encoder = TransformerBlock(
            config, pre_process=pre_process, post_process=post_process, pg_collection=self.pg_collection,
            attn_mask_type=AttnMaskType.padding, vp_stage=vp_stage,
        )
        if post_process:
            self._build_heads(config)
        self.setup_embeddings_and_output_layer()

    def _build_heads(self, config: TransformerConfig) -> None:
        # One initialization stream per head: a head's weights must not depend on whether
        # the output layer allocates its own (tied) weight, which differs across layouts.
        if self.add_lm_head:
            with initialization_stream("lm_head"):
                self.lm_head = BertLMHead(config.hidden_size, config)
            self._build_output_layer(bias=True)  # the tied output layer's own bias, as Megatron's
        if self.add_pooler:
            with initialization_stream("pooler"):
                self.pooler = Pooler(config.hidden_size, config, self.tp_group)
        if self.add_binary_head:
            with initialization_stream("binary_head"):
                self.binary_head = torch.nn.Linear(config.hidden_size, 2, dtype=config.params_dtype)
                if config.perform_initialization:
                    with torch.no_grad():
                        config.init_method(self.binary_head.weight)
                        self.binary_head.bias.zero_()

    def forward(
        self,
        input_ids: Optional[torch.Tensor],
        attention_mask: torch.Tensor,
        tokentype_ids: Optional[torch.Tensor] = None,
        lm_labels: Optional[torch.Tensor] = None,
        inference_params=None,
        return_embeddings: Optional[bool] = None,
        loss_mask: Optional[torch.Tensor] = None,
        max_masked_positions: Optional[int] = None,
    ):
        encoder_input = self.embedding(input_ids, None, tokentype_ids) if self.pre_process else None
        hidden_states = self.encoder(encoder_input, attention_mask=bert_padding_mask(attention_mask))
        if not self.post_process:
            return hidden_states
        if self.return_embeddings if return_embeddings is None else return_embeddings:
            return self._gathered(hidden_states).transpose(0, 1).contiguous()
        binary_logits = self.binary_head(self.pooler(hidden_states, 0)) if self.add_binary_head else None
        if not self.add_lm_head:
            return None, binary_logits
        if lm_labels is not None and loss_mask is not None and max_masked_positions is not None:
            return self._masked_lm_losses(hidden_states, lm_labels, loss_mask, max_masked_positions), binary_logits
        return self._logits_or_loss(self.lm_head(hidden_states), lm_labels), binary_logits

    def _masked_lm_losses(self, hidden_states, lm_labels, loss_mask, max_masked_positions: int) -> torch.Tensor:
        """The per-token loss [b, s] with the LM head run only at up to ``max_masked_positions``
        positions per sequence (per sequence-parallel slice), masked ones first; zero at the
        others (``masked_positions.py``)."""
        sequence_parallel = self.config.sequence_parallel
        slices = process_groups.group_size(self.tp_group) if sequence_parallel else 1
        positions = masked_positions.selected_positions(loss_mask, max_masked_positions, slices)
        mine = process_groups.group_rank(self.tp_group) if sequence_parallel else 0
        local = masked_positions.this_slice(positions, slices, mine, hidden_states.shape[0])
        picked = masked_positions.gather_positions(hidden_states, local)
        losses = self._logits_or_loss(self.lm_head(picked), torch.gather(lm_labels, 1, positions))
        return masked_positions.scatter_losses(losses, positions, lm_labels.shape[1])

    def pooled_output(self, input_ids, attention_mask, tokentype_ids=None) -> torch.Tensor:
        """The pooler's output [b, h] (one-stage models with a pooler only)."""
        if not (self.pre_process and self.post_process and self.add_pooler):
            raise ValueError("pooled_output needs a one-stage BertModel built with a pooler")
        hidden_states = self.encoder(self.embedding(input_ids, None, tokentype_ids), bert_padding_mask(attention_mask))
        return self.pooler(hidden_states, 0)

    def _gathered(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.config.sequence_parallel:
            return tensor_parallel.gather_from_sequence_parallel_region(
                hidden_states, self.tp_group, tensor_parallel_output_grad=False
            )
        return hidden_states
