"""The hybrid decoder stack: one layer per pattern symbol (this pipeline stage's segment),
then the final norm on the last stage."""

from __future__ import annotations

from typing import Optional

import torch

from megatron.core import process_groups, tensor_parallel
from megatron.core.fp8.layer_scope import amax_group_for, fp8_layer_scope
from megatron.core.models.mamba.hybrid_layers import AttentionLayer, MLPLayer
from megatron.core.models.mamba.layer_pattern import ATTENTION, MAMBA, MLP, MOE, parse_pattern, stage_segment
from megatron.core.transformer.init_rng import initialization_stream
from megatron.core.ssm.mamba_config import MambaConfig
from megatron.core.ssm.mamba_layer import MambaLayer
from megatron.core.transformer.torch_norm import build_norm
from megatron.core.transformer.transformer_config import TransformerConfig


def build_hybrid_layer(symbol: str, config: TransformerConfig, mamba_config: MambaConfig, layer_number: int,
                       groups: process_groups.ProcessGroups) -> torch.nn.Module:
    """The layer for one pattern symbol; ``layer_number`` is global and 1-based."""
    if symbol == MAMBA:
        return MambaLayer(config, mamba_config, layer_number, pg_collection=groups)
    if symbol == ATTENTION:
        return AttentionLayer(config, layer_number, pg_collection=groups)
    if symbol in (MLP, MOE):
        return MLPLayer(config, layer_number, moe=symbol == MOE, pg_collection=groups)
    raise ValueError(f"unknown hybrid layer symbol {symbol!r}")


class HybridStack(torch.nn.Module):
    """forward(hidden_states [s(/tp), b, h], attention_mask=None, rotary_pos_emb=None,
    inference_context=None (generation: KV cache and recurrent states)) -> [s(/tp), b, h]. Layers are this pipeline stage's segment of ``hybrid_layer_pattern``
    (model chunk ``vp_stage``'s with the interleaved schedule: ``layer_pattern.stage_segment``);
    ``final_norm`` exists on the last stage. Later stages take their input from
    ``set_input_tensor``. With --recompute-granularity full every layer's input is kept and
    the layer is recomputed in backward (--recompute-method and --recompute-num-layers are
    read as uniform groups of layers); with selective, the attention layers recompute their
    core attention (``SelfAttention`` reads the config) and the Mamba and MLP layers keep
    their activations, as in Megatron's hybrid stack."""

    def __init__(
        self,
        config: TransformerConfig,
        mamba_config: MambaConfig,
        hybrid_layer_pattern: str,
        pre_process: bool = True,
        post_process: bool = True,
        pg_collection: Optional[process_groups.ProcessGroups] = None,
        vp_stage: Optional[int] = None,
    ):
        super().__init__()
        groups = process_groups.resolve(pg_collection)
        self.config, self.pre_process, self.post_process = config, pre_process, post_process
        self.tp_group = groups.tp
        total = len("".join(parse_pattern(hybrid_layer_pattern)))
        if total != config.num_layers:
            raise ValueError(f"--hybrid-layer-pattern {hybrid_layer_pattern!r} has {total} layers but --num-layers "
                             f"is {config.num_layers}: make them agree")
        if config.recompute_granularity not in (None, "full", "selective"):
            raise ValueError(f"--recompute-granularity must be full or selective, got {config.recompute_granularity!r}")
        if config.cpu_offloading_num_layers:
            raise ValueError("--cpu-offloading-num-layers is not supported for hybrid models: drop it "
                             "(--recompute-granularity full saves activation memory there)")
        pp_size = groups.size("pp")
        vp_size = getattr(config, "virtual_pipeline_model_parallel_size", None) if pp_size > 1 else None
        segment, offset = stage_segment(hybrid_layer_pattern, pp_size, groups.rank("pp"), vp_size, vp_stage)
        self.layer_pattern, self.layer_offset = segment, offset
        layers = []
        for i, symbol in enumerate(segment):
            # Layer L's initial weights depend only on L (see transformer.init_rng); its
            # linears (a Mamba layer's in- and out-projection too) run in FP8 when layer L
            # does (--fp8-format, --first-last-layers-bf16), as in Megatron's hybrid stack.
            with initialization_stream(f"layer{offset + i + 1}"), \
                    fp8_layer_scope(config, offset + i + 1, amax_group_for(groups)):
                layers.append(build_hybrid_layer(symbol, config, mamba_config, offset + i + 1, groups))
        self.layers = torch.nn.ModuleList(layers)
        self.final_norm = build_norm(config, config.hidden_size) if post_process else None
        self.input_tensor: Optional[torch.Tensor] = None

    def set_input_tensor(self, input_tensor: Optional[torch.Tensor]) -> None:
        """Use ``input_tensor`` [s(/tp), b, h] as this stage's input (pipeline parallelism)."""
        self.input_tensor = input_tensor

    def _run(self, start: int, end: int, hidden_states, attention_mask, rotary_pos_emb, inference_context=None):
        for layer in self.layers[start:end]:
            hidden_states, _ = layer(hidden_states, attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb,
                                     inference_context=inference_context)
        return hidden_states

    def forward(self, hidden_states: Optional[torch.Tensor], attention_mask=None, rotary_pos_emb=None,
                inference_context=None):
        if not self.pre_process:
            hidden_states = self.input_tensor
        if hidden_states is None:
            raise ValueError("HybridStack got no input: pass hidden_states on the first pipeline stage, "
                             "or call set_input_tensor(...) on later stages")
        n = len(self.layers)
        if self.config.recompute_granularity == "full" and self.training and torch.is_grad_enabled():
            chunk = self.config.recompute_num_layers or 1
            for start in range(0, n, chunk):
                end = min(start + chunk, n)
                hidden_states = tensor_parallel.random.checkpoint(
                    lambda x, s=start, e=end: self._run(s, e, x, attention_mask, rotary_pos_emb),
                    self.config.distribute_saved_activations, hidden_states, tp_group=self.tp_group,
                )
        else:
            hidden_states = self._run(0, n, hidden_states, attention_mask, rotary_pos_emb, inference_context)
        if self.final_norm is not None:
            hidden_states = self.final_norm(hidden_states)
        return hidden_states
