"""Rotary position embedding (RoPE) for [s, b, n, d] activations.

Non-interleaved (default) rotates the two halves of the rotary dims, as Megatron and
Hugging Face Llama do; ``rotary_interleaved`` rotates adjacent pairs (GPT-J style).
With ``rotary_percent`` < 1 only the first ``int(d * rotary_percent)`` dims of each
head are rotated; the rest pass through unchanged.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from megatron.core.fusions.fused_rope import fused_rope, rope_reference


class RotaryEmbedding(torch.nn.Module):
    """Frequencies for RoPE.

    ``forward(max_seq_len, offset=0, device=None)`` returns angles of shape
    [max_seq_len, 1, 1, dim] (fp32), where dim = int(kv_channels * rotary_percent);
    position p gets p * base^(-2i/dim) for i < dim/2, laid out for the chosen rotation.
    The inverse frequencies are a plain attribute, not a buffer: they stay fp32 when the
    module is cast to half precision, and they are not part of the state dict.
    """

    def __init__(
        self,
        kv_channels: int,
        rotary_percent: float,
        rotary_interleaved: bool = False,
        seq_len_interpolation_factor: Optional[float] = None,
        rotary_base: int = 10000,
        rope_scaling: bool = False,
        rope_scaling_factor: float = 8.0,
    ):
        super().__init__()
        if not 0.0 < rotary_percent <= 1.0:
            raise ValueError(f"--rotary-percent must be in (0, 1], got {rotary_percent}")
        dim = int(kv_channels * rotary_percent)
        if dim % 2:
            raise ValueError(
                f"--rotary-percent {rotary_percent} gives {dim} rotary dims of the head size "
                f"{kv_channels}; it must be even: choose a percent that gives an even count"
            )
        self.dim = dim
        self.rotary_interleaved = rotary_interleaved
        self.seq_len_interpolation_factor = seq_len_interpolation_factor
        self.rotary_base = rotary_base
        self.inv_freq = 1.0 / (rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        if rope_scaling:
            self.inv_freq = llama3_scaled_inv_freq(self.inv_freq, rope_scaling_factor)
        # device -> angles of positions [0, n): built once per device and sliced, because
        # building them copies inv_freq from host memory, which waits for queued GPU work
        self._tables: dict = {}

    def forward(self, max_seq_len: int, offset: int = 0, device: Optional[torch.device] = None) -> torch.Tensor:
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        device = torch.device(device)
        table = self._tables.get(device)
        if table is None or table.size(0) < offset + max_seq_len:
            table = self._angles(offset + max_seq_len, device)
            self._tables[device] = table
        return table[offset:offset + max_seq_len]

    def _angles(self, num_positions: int, device: torch.device) -> torch.Tensor:
        """[num_positions, 1, 1, dim] angles of positions 0 .. num_positions-1."""
        inv_freq = self.inv_freq.to(device)
        seq = torch.arange(num_positions, device=device, dtype=torch.float32)
        if self.seq_len_interpolation_factor is not None:
            seq = seq / self.seq_len_interpolation_factor
        freqs = torch.outer(seq, inv_freq)  # [s, dim/2]
        if self.rotary_interleaved:
            emb = torch.stack((freqs, freqs), dim=-1).reshape(num_positions, -1)  # f0 f0 f1 f1 ...
        else:
            emb = torch.cat((freqs, freqs), dim=-1)  # f0 f1 ... f0 f1 ...
        return emb[:, None, None, :]


def llama3_scaled_inv_freq(
    inv_freq: torch.Tensor,
    factor: float = 8.0,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    original_max_position_embeddings: int = 8192,
) -> torch.Tensor:
    """Llama-3.1 frequency scaling (--use-rope-scaling, --rope-scaling-factor).

    Wavelengths longer than original_max / low_freq_factor are stretched by ``factor``;
    those shorter than original_max / high_freq_factor are kept; in between, the two are
    blended linearly in original_max / wavelength.
    """
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = original_max_position_embeddings / low_freq_factor
    high_freq_wavelen = original_max_position_embeddings / high_freq_factor
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, blended, scaled)


def apply_rotary_pos_emb(
    t: torch.Tensor,
    freqs: torch.Tensor,
    config=None,
    *,
    rotary_interleaved: Optional[bool] = None,
    mscale: float = 1.0,
    fused: Optional[bool] = None,
) -> torch.Tensor:
    """Rotate ``t`` [s, b, n, d] by angles ``freqs`` [s, 1, 1, rot_dim]; returns [s, b, n, d].

    Only the first rot_dim dims of each head rotate. ``rotary_interleaved`` defaults to
    ``config.rotary_interleaved`` (False without a config). cos/sin are taken in fp32 and
    cast to t's dtype before multiplying. ``fused`` (default: ``config.apply_rope_fusion``,
    False without a config) runs the same math as one compiled kernel on CUDA.
    """
    if rotary_interleaved is None:
        rotary_interleaved = bool(getattr(config, "rotary_interleaved", False))
    if fused is None:
        fused = bool(getattr(config, "apply_rope_fusion", False))
    rope = fused_rope if fused else rope_reference
    return rope(t, freqs, rotary_interleaved, mscale)
