"""The MLP's activation step, fused where a fused kernel exists.

``bias_activation`` is what MLPs and experts call: it adds the fc1 bias and applies the
(gated) activation, through ``bias_gelu`` / ``bias_swiglu`` when the switch is on and
the activation is one of theirs, and through the plain reference otherwise.

As in Megatron-LM, the switch changes GeLU itself: with ``bias_activation_fusion`` on
(``--bias-gelu-fusion``, the default whenever the linears have biases) ``F.gelu`` is
computed with the tanh approximation, which is what Megatron's fused bias-GeLU (and
bias-GeGLU) kernel computes; with it off, GeLU is exact (erf). Checkpoints trained by
Megatron-LM with the default flags therefore give the same outputs here.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from megatron.core.fusions.fused_bias_gelu import bias_gelu
from megatron.core.fusions.fused_bias_swiglu import bias_swiglu
from megatron.core.transformer.activations import openai_gelu


def bias_activation_reference(
    x: torch.Tensor, bias: Optional[torch.Tensor], activation: Callable, gated: bool
) -> torch.Tensor:
    """activation(x + bias), or activation(gate) * up for a gated unit ([gate; up] = x + bias)."""
    if bias is not None:
        x = x + bias
    if gated:
        gate, up = torch.chunk(x, 2, dim=-1)
        return activation(gate) * up
    return activation(x)


def clamped_glu_reference(
    x: torch.Tensor, bias: Optional[torch.Tensor], activation: Callable,
    clamp_value: Optional[float], linear_offset: float,
) -> torch.Tensor:
    """gpt-oss's gated unit: [gate; up] = x + bias, gate clamped to at most ``clamp_value``
    and up to [-clamp_value, clamp_value] (when given), then activation(gate) * (up + offset)."""
    if bias is not None:
        x = x + bias
    gate, up = torch.chunk(x, 2, dim=-1)
    if clamp_value is not None:
        gate = gate.clamp(max=clamp_value)
        up = up.clamp(min=-clamp_value, max=clamp_value)
    return activation(gate) * (up + linear_offset)


def _gelu_approximation(activation: Callable) -> Optional[str]:
    """The GeLU variant the fused path computes (Megatron's fused GeLU is the tanh one)."""
    if activation is F.gelu or activation is openai_gelu:
        return "tanh"
    return None


def bias_activation(
    x: torch.Tensor, bias: Optional[torch.Tensor], activation: Callable, gated: bool, fused: bool,
    clamp_value: Optional[float] = None, linear_offset: float = 0.0,
) -> torch.Tensor:
    """x [..., f] (or [..., 2f] gated), bias or None -> [..., f].

    ``fused`` is the config's ``bias_activation_fusion``. GeLU (exact or tanh) and gated
    SiLU (SwiGLU) have fused kernels; other activations take the reference path, and so
    does a gated unit with a clamp or a linear offset (``clamped_glu_reference``).
    """
    if gated and (clamp_value is not None or linear_offset != 0.0):
        return clamped_glu_reference(x, bias, activation, clamp_value, linear_offset)
    if fused:
        if gated and activation is F.silu:
            return bias_swiglu(x, bias)
        approximate = _gelu_approximation(activation)
        if not gated and approximate is not None:
            return bias_gelu(x, bias, approximate)
        if gated and approximate is not None:
            return bias_activation_reference(x, bias, openai_gelu, gated)
    return bias_activation_reference(x, bias, activation, gated)
