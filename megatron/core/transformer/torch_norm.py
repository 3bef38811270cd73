"""LayerNorm and RMSNorm in plain PyTorch, computed in fp32.

Both keep Megatron-Core's parameter names (``weight``, and ``bias`` for LayerNorm) and
support ``zero_centered_gamma`` (--apply-layernorm-1p): the stored weight is gamma - 1,
initialized to zero, which keeps weight decay from pulling gamma towards zero.

With ``fused`` (the config's ``persist_layer_norm``, on unless --no-persist-layer-norm)
the math runs as one compiled kernel on CUDA (``megatron/core/fusions/fused_norms.py``);
the eager reference is the same formula.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron.core.fusions.fused_bias_dropout_add_norm import bias_dropout_add_norm
from megatron.core.fusions.fused_norms import (
    fused_layer_norm,
    fused_rms_norm,
    layer_norm_reference,
    rms_norm_reference,
)
from megatron.core.transformer.transformer_config import TransformerConfig


def _mark_sequence_parallel(module: torch.nn.Module, sequence_parallel: bool) -> None:
    # Norm weights see only this rank's sequence shard under sequence parallelism, so
    # their grads must be all-reduced over the tensor-parallel group; the attribute
    # tells the gradient-finalization code which parameters need it.
    for param in module.parameters():
        setattr(param, "sequence_parallel", sequence_parallel)


class _Norm(torch.nn.Module):
    """What both norms share: the ``weight`` (gamma, or gamma - 1 when zero-centered), the
    epsilon, the sequence-parallel marking of their parameters, and whether the fused
    kernel computes them (``fused``, a plain attribute, not state).

    Called with a ``residual`` (a pre-norm layer's residual add, then this norm), the module
    returns the new residual stream and its norm from one fused region
    (``fusions/fused_bias_dropout_add_norm.py``). It is the module that is called, not a
    helper, so hooks on it still run: the distributed optimizer's wait for the module's
    all-gathered parameters under --overlap-param-gather among them."""

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-5,
        zero_centered_gamma: bool = False,
        sequence_parallel: bool = False,
        params_dtype: torch.dtype = torch.float32,
        bias: bool = False,
        fused: bool = False,
    ):
        super().__init__()
        self.fused = fused
        self.hidden_size = hidden_size
        self.eps = eps
        self.zero_centered_gamma = zero_centered_gamma
        init = torch.zeros if zero_centered_gamma else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=params_dtype))
        if bias:
            self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=params_dtype))
        _mark_sequence_parallel(self, sequence_parallel)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None, dropout_prob: float = 0.0,
                training: bool = False, x_bias: Optional[torch.Tensor] = None):
        """norm(x); with ``residual``: (hidden, norm(hidden)) for hidden = residual +
        dropout(x + x_bias), one fused region."""
        if residual is None:
            return self._norm(x)
        return bias_dropout_add_norm(x, x_bias, residual, dropout_prob, training, self.weight,
                                     getattr(self, "bias", None), self.eps, self.zero_centered_gamma,
                                     isinstance(self, RMSNorm))


class LayerNorm(_Norm):
    """LayerNorm over the last dim; input [..., hidden] -> output [..., hidden].

    The math runs in fp32; the output has the dtype of the weight (so an fp32 residual
    stream feeds half-precision linears in half precision).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, zero_centered_gamma: bool = False,
                 sequence_parallel: bool = False, params_dtype: torch.dtype = torch.float32, fused: bool = False):
        super().__init__(hidden_size, eps, zero_centered_gamma, sequence_parallel, params_dtype, bias=True, fused=fused)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        norm = fused_layer_norm if self.fused else layer_norm_reference
        return norm(x, self.weight, self.bias, self.eps, self.zero_centered_gamma)


class RMSNorm(_Norm):
    """RMSNorm over the last dim: x / sqrt(mean(x^2) + eps) * weight.

    Input [..., hidden] -> output [..., hidden] in the weight's dtype; fp32 math.
    """

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        norm = fused_rms_norm if self.fused else rms_norm_reference
        return norm(x, self.weight, self.eps, self.zero_centered_gamma)


class L2Norm(torch.nn.Module):
    """Llama 4's query/key norm (--qk-l2-norm): x * rsqrt(mean(x^2) + eps) over the last
    dim, an RMSNorm without a weight, so it has no parameters.

    Input [..., hidden] -> output [..., hidden] in the input's dtype; fp32 math.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, **_unused):
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_float = x.float()
        return (x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def build_norm(config: TransformerConfig, hidden_size: int, eps: float | None = None) -> torch.nn.Module:
    """The norm chosen by --normalization, sized ``hidden_size``.

    ``eps`` defaults to --norm-epsilon. Weights carry ``sequence_parallel`` from the
    config; ``persist_layer_norm`` selects the fused kernel.
    """
    cls = {"LayerNorm": LayerNorm, "RMSNorm": RMSNorm}.get(config.normalization)
    if cls is None:
        raise ValueError(
            f"--normalization {config.normalization!r} is not supported: use LayerNorm or RMSNorm"
        )
    return cls(
        hidden_size,
        eps=config.layernorm_epsilon if eps is None else eps,
        zero_centered_gamma=config.layernorm_zero_centered_gamma,
        sequence_parallel=config.sequence_parallel,
        params_dtype=config.params_dtype,
        fused=config.persist_layer_norm,
    )


class WrappedTorchNorm:
    """Megatron-Core's config-following norm in layer specs: building it gives the
    LayerNorm or RMSNorm ``config.normalization`` names (``build_norm``)."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float | None = None, **_unused):
        return build_norm(config, hidden_size, eps)
