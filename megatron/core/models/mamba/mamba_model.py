"""MambaModel: embedding -> hybrid stack (layers from the pattern) -> final norm -> output layer.

The embedding, the output layer, the tied-weight handling and the loss are GPT's
(``LanguageModule``, ``LanguageModelEmbedding``). Attention layers in the pattern use
rotary positions with --position-embedding-type rope; the default is none (Mamba layers
need no positions).
"""

from __future__ import annotations

from typing import Optional


from megatron.core import process_groups
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.models.mamba.hybrid_stack import HybridStack
from megatron.core.models.mamba.layer_pattern import MAMBA
from megatron.core.ssm.mamba_config import MambaConfig
from megatron.core.transformer.transformer_config import TransformerConfig

_POSITION_TYPES = ("none", "rope")


class MambaModel(LanguageModule):
    """Hybrid language model (one pipeline stage of it when pre/post_process are not both set).

    forward(input_ids [b, s], position_ids, attention_mask, decoder_input=None, labels=None,
    inference_context=None) has GPTModel's contract: hidden states [s(/tp), b, h] when not
    post_process, logits [b, s, V/tp] without labels, per-token fp32 loss [b, s] with labels.
    The attention mask (None or bool [b or 1, 1, s, s], True = masked) reaches only the
    attention layers. During generation ``inference_context`` (a ``StaticInferenceContext``)
    is the attention layers' KV cache and the Mamba layers' recurrent states.
    """

    # Megatron-LM builds hybrid stacks from Transformer Engine modules only.
    megatron_te_norm_names = True

    def __init__(
        self,
        config: TransformerConfig,
        mamba_config: MambaConfig,
        hybrid_layer_pattern: str,
        vocab_size: int,
        max_sequence_length: int = 0,
        pre_process: bool = True,
        post_process: bool = True,
        fp16_lm_cross_entropy: bool = False,
        parallel_output: bool = True,
        share_embeddings_and_output_weights: bool = False,
        position_embedding_type: str = "none",
        rotary_percent: float = 1.0,
        rotary_base: int = 10000,
        pg_collection: Optional[process_groups.ProcessGroups] = None,
        vp_stage: Optional[int] = None,
    ):
        super().__init__(config, pg_collection=pg_collection)
        self.vp_stage = vp_stage
        self._init_language_model(
            vocab_size=vocab_size, max_sequence_length=max_sequence_length, pre_process=pre_process,
            post_process=post_process, fp16_lm_cross_entropy=fp16_lm_cross_entropy, parallel_output=parallel_output,
            share_embeddings_and_output_weights=share_embeddings_and_output_weights,
            position_embedding_type=position_embedding_type,
        )
        if position_embedding_type not in _POSITION_TYPES:
            raise ValueError(f"--position-embedding-type {position_embedding_type!r} is not supported for hybrid "
                             f"models: use {' or '.join(_POSITION_TYPES)}")
        self.hybrid_layer_pattern = hybrid_layer_pattern
        if pre_process:
            self._build_embedding()
        if position_embedding_type == "rope":
            self.rotary_pos_emb = RotaryEmbedding(config.kv_channels, rotary_percent,
                                                  rotary_interleaved=config.rotary_interleaved, rotary_base=rotary_base)
        self.decoder = HybridStack(config, mamba_config, hybrid_layer_pattern, pre_process=pre_process,
                                   post_process=post_process, pg_collection=self.pg_collection, vp_stage=vp_stage)
        if post_process:
            self._build_output_layer(bias=False)
        self.setup_embeddings_and_output_layer()

    @property
    def has_recurrent_state(self) -> bool:
        """The whole model (every pipeline stage alike) has Mamba layers, whose generation
        state is a recurrent one rather than a KV cache."""
        return MAMBA in self.hybrid_layer_pattern

    def forward(self, input_ids, position_ids=None, attention_mask=None, decoder_input=None, labels=None,
                inference_context=None):
        if decoder_input is None and self.pre_process:
            decoder_input = self.embedding(input_ids, position_ids)
        hidden_states = self.decoder(decoder_input, attention_mask=attention_mask,
                                     rotary_pos_emb=self._rotary_freqs(decoder_input, inference_context),
                                     inference_context=inference_context)
        if not self.post_process:
            return hidden_states
        if inference_context is not None and inference_context.materialize_only_last_token_logits:
            hidden_states = hidden_states[-1:]  # generation without log-probs needs the next token only
        return self._logits_or_loss(hidden_states, labels)
