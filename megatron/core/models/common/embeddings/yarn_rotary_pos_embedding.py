"""YaRN rotary position embedding (used by multi-latent attention, as in Megatron-LM).

YaRN extends a RoPE model's context by ``scaling_factor``: the low frequencies (dims that turn
less than ``beta_slow`` times over ``original_max_position_embeddings``) are interpolated
(divided by the factor), the high ones (more than ``beta_fast`` turns) kept, with a linear
ramp in between; cos/sin are multiplied by ``yarn_get_mscale(factor, mscale) /
yarn_get_mscale(factor, mscale_all_dim)`` (``YarnRotaryEmbedding.mscale``). With a factor of
1 it is plain RoPE.
"""

from __future__ import annotations

import math

import torch

from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention-scale factor: 1 for scale <= 1, else 0.1 * mscale * ln(scale) + 1."""
    if scale <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _correction_dim(num_rotations: float, dim: int, base: float, max_position_embeddings: int) -> float:
    """The rotary dim whose frequency turns ``num_rotations`` times over the original length."""
    return (dim * math.log(max_position_embeddings / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def yarn_inv_freq(dim: int, base: float, scaling_factor: float, original_max_position_embeddings: int,
                  beta_fast: float, beta_slow: float, round_to_int: bool) -> torch.Tensor:
    """The [dim / 2] fp32 inverse frequencies of YaRN."""
    extrapolation = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    interpolation = extrapolation / scaling_factor
    low = _correction_dim(beta_fast, dim, base, original_max_position_embeddings)
    high = _correction_dim(beta_slow, dim, base, original_max_position_embeddings)
    if round_to_int:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a one-dim ramp would divide by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1.0 - ramp  # 1: extrapolate (high frequencies kept), 0: interpolate
    return interpolation * (1.0 - keep) + extrapolation * keep


class YarnRotaryEmbedding(RotaryEmbedding):
    """``RotaryEmbedding`` with YaRN's frequencies; ``mscale`` is the cos/sin factor the
    attention applies with them."""

    def __init__(self, kv_channels: int, rotary_base: float = 10000, scaling_factor: float = 1.0,
                 original_max_position_embeddings: int = 4096, beta_fast: float = 32.0, beta_slow: float = 1.0,
                 mscale: float = 1.0, mscale_all_dim: float = 0.0, correction_range_round_to_int: bool = True):
        super().__init__(kv_channels, 1.0, rotary_base=rotary_base)
        self.inv_freq = yarn_inv_freq(
            self.dim, float(rotary_base), scaling_factor, original_max_position_embeddings, beta_fast, beta_slow,
            correction_range_round_to_int,
        )
        self.mscale = yarn_get_mscale(scaling_factor, mscale) / yarn_get_mscale(scaling_factor, mscale_all_dim)
