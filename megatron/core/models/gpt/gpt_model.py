"""GPTModel: embedding -> TransformerBlock (pre-norm decoder) -> output layer.

GPT-2/3 (learned positions, LayerNorm, GeLU, biases, tied output) and LLaMA / Mistral /
Qwen2 (RoPE, RMSNorm, SwiGLU, GQA, untied, no bias / qkv bias, sliding window) are the
same module with different config flags. Parameter names follow Megatron-Core's local
layer spec, so checkpoints map one to one.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from megatron.core import process_groups
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.multi_latent_attention import mla_rotary_embedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionBlock, check_mtp_config
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron.core.models.gpt.spec_check import check_layer_spec

logger = logging.getLogger(__name__)

_POSITION_TYPES = ("learned_absolute", "rope", "none")


class GPTModel(LanguageModule):
    """Decoder-only language model (one pipeline stage of it when pre/post_process are not both set).

    forward(input_ids [b, s], position_ids [b, s] or None, attention_mask None or bool
    [b or 1, 1, s, s] (True = masked; the causal mask is always applied), decoder_input=None,
    labels=None, inference_context=None):
      - not post_process: the hidden states [s(/tp), b, h] for the next stage;
      - labels None: logits [b, s, V/tp] (full V when parallel_output=False);
      - labels [b, s]: per-token loss [b, s] in fp32.
    With ``config.mtp_num_layers`` the model holds the ``mtp`` block: in training with labels
    its scaled loss (over ``loss_mask`` [b, s], default all tokens) joins the backward pass
    while the returned LM loss stays as is (``transformer.multi_token_prediction``).

    ``transformer_layer_spec`` (from ``gpt_layer_specs``) is checked, not used to build: the
    layers are always the local PyTorch ones the config asks for, and a spec asking for
    anything else raises ValueError (``spec_check``). ``num_layers_in_stage`` and
    ``layer_offset`` select this stage's layers (default: this pipeline stage's share, or
    virtual chunk ``vp_stage``'s with the interleaved schedule; all layers without pipelining).
    Rotary position embedding ignores ``position_ids`` (positions are 0..s-1), as
    Megatron's does. ``inference_context`` (a KV cache from ``megatron.core.inference``)
    makes this call continue the cached sequences: it gives the rotary angles of the new
    tokens' positions (pass the same positions as ``position_ids`` for learned absolute
    positions).
    """

    # Megatron-LM's GPTModel drops the output layer's empty extra state from its torch_dist
    # checkpoints (its legacy files keep it).
    megatron_output_extra_state = False

    def __init__(
        self,
        config: TransformerConfig,
        transformer_layer_spec=None,
        vocab_size: int = 0,
        max_sequence_length: int = 0,
        pre_process: bool = True,
        post_process: bool = True,
        fp16_lm_cross_entropy: bool = False,
        parallel_output: bool = True,
        share_embeddings_and_output_weights: bool = True,
        position_embedding_type: str = "learned_absolute",
        rotary_percent: float = 1.0,
        rotary_base: int = 10000,
        seq_len_interpolation_factor: Optional[float] = None,
        rope_scaling: bool = False,
        rope_scaling_factor: float = 8.0,
        pg_collection: Optional[process_groups.ProcessGroups] = None,
        num_layers_in_stage: Optional[int] = None,
        layer_offset: int = 0,
        vp_stage: Optional[int] = None,
    ):
        super().__init__(config, pg_collection=pg_collection)
        self._init_language_model(
            vocab_size=vocab_size, max_sequence_length=max_sequence_length, pre_process=pre_process,
            post_process=post_process, fp16_lm_cross_entropy=fp16_lm_cross_entropy, parallel_output=parallel_output,
            share_embeddings_and_output_weights=share_embeddings_and_output_weights,
            position_embedding_type=position_embedding_type,
        )
        if position_embedding_type not in _POSITION_TYPES:
            raise ValueError(
                f"--position-embedding-type {position_embedding_type!r} is not supported: "
                f"use one of {', '.join(_POSITION_TYPES)}"
            )
        if position_embedding_type == "learned_absolute" and max_sequence_length <= 0:
            raise ValueError(
                "--max-position-embeddings must be > 0 with learned absolute position embeddings, "
                f"got {max_sequence_length}"
            )
        check_layer_spec(transformer_layer_spec, config)
        if config.mtp_num_layers:
            check_mtp_config(config, position_embedding_type, self.pg_collection)
        if config.multi_latent_attention and (position_embedding_type != "rope" or rotary_percent != 1.0
                                              or rope_scaling or seq_len_interpolation_factor):
            raise ValueError(
                "--multi-latent-attention needs --position-embedding-type rope with --rotary-percent 1.0 and "
                f"neither --use-rope-scaling nor --rotary-seq-len-interpolation-factor (got {position_embedding_type!r}, "
                f"{rotary_percent}, {rope_scaling}, {seq_len_interpolation_factor}): its RoPE runs on its own "
                "qk_pos_emb_head_dim dims and extends the context with YaRN (--rotary-scaling-factor)"
            )
        self.transformer_layer_spec = transformer_layer_spec
        self.vp_stage = vp_stage
        if pre_process:
            self._build_embedding()
        if position_embedding_type == "rope" and config.multi_latent_attention:
            self.rotary_pos_emb = mla_rotary_embedding(config, rotary_base)
        elif position_embedding_type == "rope":
            self.rotary_pos_emb = RotaryEmbedding(
                config.kv_channels,
                rotary_percent,
                rotary_interleaved=config.rotary_interleaved,
                seq_len_interpolation_factor=seq_len_interpolation_factor,
                rotary_base=rotary_base,
                rope_scaling=rope_scaling,
                rope_scaling_factor=rope_scaling_factor,
            )
        self.decoder = TransformerBlock(
            config,
            pre_process=pre_process,
            post_process=post_process,
            pg_collection=self.pg_collection,
            num_layers=num_layers_in_stage,
            layer_offset=layer_offset,
            vp_stage=vp_stage,
        )
        if post_process:
            self._build_output_layer(bias=False)
        self.mtp = None
        if config.mtp_num_layers:
            self.mtp = MultiTokenPredictionBlock(config, self.pg_collection)
        if post_process:
            if config.cross_entropy_loss_fusion and config.cross_entropy_fusion_impl == "te":
                logger.info("--cross-entropy-fusion-impl te: using the native chunked cross entropy (no Transformer Engine needed)")
        self.setup_embeddings_and_output_layer()

    def forward(
        self,
        input_ids: Optional[torch.Tensor],
        position_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        decoder_input: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        inference_context=None,
        loss_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if decoder_input is None and self.pre_process:
            decoder_input = self.embedding(input_ids, position_ids)
        rotary_pos_emb = self._rotary_freqs(decoder_input, inference_context)
        hidden_states = self.decoder(
            decoder_input, attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb, inference_context=inference_context
        )
        if not self.post_process:
            return hidden_states
        if inference_context is not None and inference_context.materialize_only_last_token_logits:
            hidden_states = hidden_states[-1:]  # generation without log-probs needs the next token only
        if self.mtp is not None and labels is not None and self.training and torch.is_grad_enabled():
            hidden_states = self._with_mtp_loss(hidden_states, input_ids, position_ids, labels, loss_mask,
                                                attention_mask, rotary_pos_emb)
        return self._logits_or_loss(hidden_states, labels)

    def _with_mtp_loss(self, hidden_states, input_ids, position_ids, labels, loss_mask, attention_mask, rotary_pos_emb):
        """The decoder output with the MTP depths' scaled loss attached for backward (training
        only: evaluation and generation ignore the MTP depths, as Megatron-Core does by default)."""
        losses = self.mtp.depth_losses(
            hidden_states, input_ids, position_ids, labels,
            embed=self.embedding,
            loss_of=lambda hidden, shifted: self._logits_or_loss(hidden, shifted),
            attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb,
        )
        if loss_mask is None:
            loss_mask = torch.ones_like(labels, dtype=torch.float32)
        return self.mtp.attach(hidden_states, losses, loss_mask)
