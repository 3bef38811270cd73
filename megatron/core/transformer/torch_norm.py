"""LayerNorm and RMSNorm in plain PyTorch, computed in fp32.

Both keep Megatron-Core's parameter names (``weight``, and ``bias`` for LayerNorm) and
support ``zero_centered_gamma`` (--apply-layernorm-1p): the stored weight is gamma - 1,
initialized to zero, which keeps weight decay from pulling gamma towards zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron.core.transformer.transformer_config import TransformerConfig


def _mark_sequence_parallel(module: torch.nn.Module, sequence_parallel: bool) -> None:
    # Norm weights see only this rank's sequence shard under sequence parallelism, so
    # their grads must be all-reduced over the tensor-parallel group; the attribute
    # tells the gradient-finalization code which parameters need it.
    for param in module.parameters():
        setattr(param, "sequence_parallel", sequence_parallel)


class _Norm(torch.nn.Module):
    """What both norms share: the ``weight`` (gamma, or gamma - 1 when zero-centered), the
    epsilon, and the sequence-parallel marking of their parameters."""

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-5,
        zero_centered_gamma: bool = False,
        sequence_parallel: bool = False,
        params_dtype: torch.dtype = torch.float32,
        bias: bool = False,
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.zero_centered_gamma = zero_centered_gamma
        init = torch.zeros if zero_centered_gamma else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=params_dtype))
        if bias:
            self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=params_dtype))
        _mark_sequence_parallel(self, sequence_parallel)

    def _gamma(self) -> torch.Tensor:
        """gamma in fp32."""
        return self.weight.float() + 1.0 if self.zero_centered_gamma else self.weight.float()


class LayerNorm(_Norm):
    """LayerNorm over the last dim; input [..., hidden] -> output [..., hidden].

    The math runs in fp32; the output has the dtype of the weight (so an fp32 residual
    stream feeds half-precision linears in half precision).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, zero_centered_gamma: bool = False,
                 sequence_parallel: bool = False, params_dtype: torch.dtype = torch.float32):
        super().__init__(hidden_size, eps, zero_centered_gamma, sequence_parallel, params_dtype, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.layer_norm(x.float(), (self.hidden_size,), self._gamma(), self.bias.float(), self.eps)
        return out.to(self.weight.dtype)


class RMSNorm(_Norm):
    """RMSNorm over the last dim: x / sqrt(mean(x^2) + eps) * weight.

    Input [..., hidden] -> output [..., hidden] in the weight's dtype; fp32 math.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self._gamma()).to(self.weight.dtype)


def build_norm(config: TransformerConfig, hidden_size: int, eps: float | None = None) -> torch.nn.Module:
    """The norm chosen by --normalization, sized ``hidden_size``.

    ``eps`` defaults to --norm-epsilon. Weights carry ``sequence_parallel`` from the
    config.
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
    )
