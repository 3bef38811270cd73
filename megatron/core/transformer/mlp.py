"""Position-wise MLP: fc1 (column parallel) -> activation -> fc2 (row parallel).

With a gated linear unit (--swiglu) fc1 is twice as wide and its output is [gate; up]:
out = fc2(act(gate) * up). Under tensor parallelism each rank's fc1 shard holds its part
of gate followed by its part of up (stride-2 partitioning), so the full fc1 weight of a
TP=1 checkpoint is [gate; up] and resharding splits each half separately.

The fc1 bias is added together with the activation (``fusions.fused_bias_activation``),
one fused kernel for GeLU and SwiGLU unless --no-bias-gelu-fusion / --no-bias-swiglu-fusion.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from megatron.core import process_groups, tensor_parallel
from megatron.core.fusions.fused_bias_activation import bias_activation
from megatron.core.transformer.activations import openai_gelu
from megatron.core.transformer.transformer_config import TransformerConfig


def _activation(config: TransformerConfig):
    if config.openai_gelu and config.activation_func is F.gelu:
        return openai_gelu
    return config.activation_func


class MLP(torch.nn.Module):
    """forward(hidden_states [s(/tp), b, h]) -> (output [s(/tp), b, h], fc2 bias or None).

    The fc2 bias is returned unadded (for the layer's bias-dropout-add).
    ``input_size`` / ``ffn_hidden_size`` default to the config's (experts may differ).
    """

    def __init__(
        self,
        config: TransformerConfig,
        pg_collection: Optional[process_groups.ProcessGroups] = None,
        input_size: Optional[int] = None,
        ffn_hidden_size: Optional[int] = None,
        tp_group=None,
    ):
        super().__init__()
        self.config = config
        self.tp_group = tp_group if tp_group is not None else process_groups.resolve(pg_collection).tp
        self.input_size = config.hidden_size if input_size is None else input_size
        ffn = config.ffn_hidden_size if ffn_hidden_size is None else ffn_hidden_size
        self.gated = config.gated_linear_unit
        self.activation_func = _activation(config)
        self.bias_activation_fusion = config.bias_activation_fusion
        self.linear_fc1 = tensor_parallel.ColumnParallelLinear(
            self.input_size,
            2 * ffn if self.gated else ffn,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=config.add_bias_linear,
            skip_bias_add=True,
            stride=2 if self.gated else 1,
            tp_group=self.tp_group,
        )
        self.linear_fc2 = tensor_parallel.RowParallelLinear(
            ffn,
            self.input_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=config.add_bias_linear,
            input_is_parallel=True,
            skip_bias_add=True,
            tp_group=self.tp_group,
        )

    def forward(self, hidden_states: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        intermediate, bias = self.linear_fc1(hidden_states)
        intermediate = bias_activation(
            intermediate, bias, self.activation_func, self.gated, self.bias_activation_fusion,
            self.config.activation_func_clamp_value, self.config.glu_linear_offset,
        )
        return self.linear_fc2(intermediate)
