"""Rotary position embedding applied in one kernel.

cos/sin of the angles are computed inside the kernel from ``freqs`` (cheap, and it saves
writing and reading two [s, 1, 1, d] tables per call), and the rotated and pass-through
parts are written straight into the output.
"""

from __future__ import annotations

import torch

from megatron.core.fusions.compiled_region import CompiledRegion


def rotate_half(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the halves of the last dim, or over adjacent pairs when interleaved."""
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((-x2, x1), dim=-1).flatten(-2)
    x1, x2 = torch.chunk(x, 2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool, mscale: float) -> torch.Tensor:
    """Rotate the first rot_dim dims of each head of ``t`` [s, b, n, d] by ``freqs`` [>=s, 1, 1, rot_dim].

    cos/sin are taken in fp32, scaled by ``mscale`` and cast to t's dtype before multiplying.
    """
    rot_dim = freqs.shape[-1]
    t_rot, t_pass = t[..., :rot_dim], t[..., rot_dim:]
    freqs = freqs[: t.shape[0]]
    cos = (torch.cos(freqs) * mscale).to(t.dtype)
    sin = (torch.sin(freqs) * mscale).to(t.dtype)
    t_rot = t_rot * cos + rotate_half(t_rot, interleaved) * sin
    if t_pass.shape[-1] == 0:
        return t_rot
    return torch.cat((t_rot, t_pass), dim=-1)


_rope = CompiledRegion(rope_reference, "rope")


def fused_rope(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool, mscale: float = 1.0) -> torch.Tensor:
    """Fused ``rope_reference`` (same contract)."""
    return _rope(t, freqs, interleaved, mscale)
