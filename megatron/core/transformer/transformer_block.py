"""A stack of transformer layers (one pipeline stage's share), with activation recompute
or CPU offloading of activations."""

from __future__ import annotations

from typing import Optional

import torch

from megatron.core import process_groups, tensor_parallel
from megatron.core.fp8.layer_scope import amax_group_for, fp8_layer_scope
from megatron.core.transformer.activation_offload import check_cpu_offloading, offloading_context
from megatron.core.transformer.init_rng import initialization_stream
from megatron.core.pipeline_parallel.layer_split import stage_layers_from_config
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.torch_norm import build_norm
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer


def _check_recompute(config: TransformerConfig) -> None:
    granularity = config.recompute_granularity
    if granularity not in (None, "full", "selective"):
        raise ValueError(f"--recompute-granularity must be full or selective, got {granularity!r}")
    if granularity == "full":
        if config.recompute_method not in ("uniform", "block"):
            raise ValueError(
                f"--recompute-granularity full needs --recompute-method uniform or block, got "
                f"{config.recompute_method!r}: set --recompute-method"
            )
        if not isinstance(config.recompute_num_layers, int) or config.recompute_num_layers < 1:
            raise ValueError(
                f"--recompute-granularity full needs --recompute-num-layers >= 1, got "
                f"{config.recompute_num_layers!r}: set --recompute-num-layers"
            )
    elif granularity == "selective" and config.recompute_method is not None:
        raise ValueError(
            f"--recompute-method {config.recompute_method} cannot be used with --recompute-granularity "
            "selective (selective recompute picks modules, not layers): drop --recompute-method"
        )


class TransformerBlock(torch.nn.Module):
    """Layers ``offset+1 .. offset+num_layers`` (1-based, global numbering) and the final norm.

    forward(hidden_states [s(/tp), b, h], attention_mask=None, rotary_pos_emb=None,
    inference_context=None (a KV cache during generation)) -> [s(/tp), b, h]. When not
    ``pre_process`` the input comes from ``set_input_tensor`` (the activation received
    from the previous pipeline stage) and ``hidden_states`` is ignored. ``final_layernorm``
    exists when ``post_process`` and ``post_layer_norm`` (pre-norm stacks only); a post-norm
    stack (``transformer_block_type='post_ln'``) instead normalizes its input on the first
    stage (``initial_layernorm``). ``spec`` is accepted for Megatron-Core signature
    compatibility and ignored: the layers are always the local (pure PyTorch) ones.
    ``num_layers`` None: all layers with
    one pipeline stage, else this stage's (chunk ``vp_stage``'s) share as
    ``pipeline_parallel.layer_split`` assigns it (``layer_offset`` is then ignored).
    """

    def __init__(
        self,
        config: TransformerConfig,
        spec=None,
        post_layer_norm: bool = True,
        pre_process: bool = True,
        post_process: bool = True,
        pg_collection: Optional[process_groups.ProcessGroups] = None,
        num_layers: Optional[int] = None,
        layer_offset: int = 0,
        attn_mask_type: AttnMaskType = AttnMaskType.causal,
        vp_stage: Optional[int] = None,
    ):
        super().__init__()
        _check_recompute(config)
        check_cpu_offloading(config)
        self.config = config
        self.pre_process = pre_process
        self.post_process = post_process
        self.post_layer_norm = post_layer_norm
        groups = process_groups.resolve(pg_collection)
        self.tp_group = groups.tp
        if num_layers is None:
            num_layers, layer_offset = stage_layers_from_config(config, groups.size("pp"), groups.rank("pp"), vp_stage)
        if num_layers < 0 or layer_offset < 0 or layer_offset + num_layers > config.num_layers:
            raise ValueError(
                f"a block of {num_layers} layers at offset {layer_offset} does not fit in "
                f"--num-layers {config.num_layers}: check the pipeline layer split"
            )
        self.layer_offset = layer_offset
        self.vp_stage = vp_stage
        # Consecutive layers fuse each residual add with the next input norm (_run_layers);
        # wrappers that gather a layer's parameters only while it runs (FSDP2) turn it off.
        self.chain_layers = True
        self.layers = torch.nn.ModuleList(
            self._build_layer(config, layer_offset + i + 1, groups, attn_mask_type) for i in range(num_layers)
        )
        post_ln = config.transformer_block_type == "post_ln"
        self.initial_layernorm = build_norm(config, config.hidden_size) if post_ln and pre_process else None
        self.final_layernorm = (
            build_norm(config, config.hidden_size) if post_process and post_layer_norm and not post_ln else None
        )
        self.input_tensor: Optional[torch.Tensor] = None

    @staticmethod
    def _build_layer(config, layer_number: int, groups, attn_mask_type) -> TransformerLayer:
        # Layer L's initial weights depend only on L (see transformer.init_rng).
        with initialization_stream(f"layer{layer_number}"), \
                fp8_layer_scope(config, layer_number, amax_group_for(groups)):
            return TransformerLayer(config, layer_number=layer_number, pg_collection=groups, attn_mask_type=attn_mask_type)

    def set_input_tensor(self, input_tensor: Optional[torch.Tensor]) -> None:
        """Use ``input_tensor`` [s(/tp), b, h] as this stage's input (pipeline parallelism)."""
        self.input_tensor = input_tensor

    def _run_layers(self, start: int, end: int, hidden_states, attention_mask, rotary_pos_emb, inference_context=None):
        layers = self.layers[start:end]
        normed = None
        for i, layer in enumerate(layers):
            # Consecutive layers of one run chain: a layer's last residual add and the next
            # layer's input norm are one fused region (TransformerLayer.chains_into).
            following = layers[i + 1] if i + 1 < len(layers) else None
            chains = self.chain_layers and following is not None and layer.chains_into(following)
            hidden_states, normed = layer(
                hidden_states, attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb,
                inference_context=inference_context, normed_input=normed,
                next_norm=following.input_layernorm if chains else None,
            )
        return hidden_states

    def _checkpointed(self, start: int, end: int, hidden_states, attention_mask, rotary_pos_emb):
        """Run layers [start, end) keeping only their input; recompute them in backward."""

        def run(x):
            return self._run_layers(start, end, x, attention_mask, rotary_pos_emb)

        return tensor_parallel.random.checkpoint(
            run, self.config.distribute_saved_activations, hidden_states, tp_group=self.tp_group
        )

    def _forward_full_recompute(self, hidden_states, attention_mask, rotary_pos_emb):
        n = len(self.layers)
        chunk = self.config.recompute_num_layers
        if self.config.recompute_method == "uniform":
            # Checkpoint the input of every group of `chunk` layers.
            for start in range(0, n, chunk):
                hidden_states = self._checkpointed(start, min(start + chunk, n), hidden_states, attention_mask, rotary_pos_emb)
            return hidden_states
        # block: checkpoint the first `chunk` layers of this stage, keep the rest.
        for i in range(n):
            if i < chunk:
                hidden_states = self._checkpointed(i, i + 1, hidden_states, attention_mask, rotary_pos_emb)
            else:
                hidden_states = self._run_layers(i, i + 1, hidden_states, attention_mask, rotary_pos_emb)
        return hidden_states

    def forward(
        self,
        hidden_states: Optional[torch.Tensor],
        attention_mask: Optional[torch.Tensor] = None,
        rotary_pos_emb=None,
        inference_context=None,
    ) -> torch.Tensor:
        if not self.pre_process:
            hidden_states = self.input_tensor
        if hidden_states is None:
            raise ValueError(
                "TransformerBlock got no input: pass hidden_states on the first pipeline stage, "
                "or call set_input_tensor(...) on later stages"
            )
        if self.initial_layernorm is not None:
            hidden_states = self.initial_layernorm(hidden_states)
        full_recompute = (
            self.config.recompute_granularity == "full" and self.training and torch.is_grad_enabled()
        )
        if full_recompute:
            hidden_states = self._forward_full_recompute(hidden_states, attention_mask, rotary_pos_emb)
        else:
            offloaded = min(self.config.cpu_offloading_num_layers, len(self.layers))
            with offloading_context(offloaded > 0 and self.training and torch.is_grad_enabled()):
                hidden_states = self._run_layers(
                    0, offloaded, hidden_states, attention_mask, rotary_pos_emb, inference_context
                )
            hidden_states = self._run_layers(
                offloaded, len(self.layers), hidden_states, attention_mask, rotary_pos_emb, inference_context
            )
        if self.final_layernorm is not None:
            hidden_states = self.final_layernorm(hidden_states)
        return hidden_states
