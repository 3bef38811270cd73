"""Mamba-2 generation with a recurrent state: the prefill leaves the state behind, one
step advances it by one token.

A Mamba-2 mixer's memory of the tokens so far is, per sequence:

  conv state  [b, conv_dim, d_conv - 1]   the last d_conv - 1 inputs of the causal conv1d
                                          (x, B and C channels before the convolution)
  SSM state   [b, h, p, n]                the scan's state after the last token, fp32

so decoding costs the same at every position, whatever the length of the text. With
tensor parallelism each rank keeps the states of its own heads and groups (h, g and
conv_dim are the rank's local sizes); nothing crosses ranks.

The step is the recurrence the chunked scan computes in bulk (``ssd_reference``):

  state_t = exp(dt_t * A) * state_{t-1} + dt_t * x_t (outer) B_t
  y_t     = state_t . C_t + D * x_t

The state after a prefill is the same sum written out:
state_L = sum_t exp(dt_{t+1} A + ... + dt_L A) * dt_t * x_t (outer) B_t (zero initial state).
A block of several tokens after a state (a prompt prefilled in chunks) runs the chunked
scan from zero and adds what the initial state contributes (``output_from_initial_state``;
the recurrence is linear in the state), so the scan itself never needs an initial state.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 math for every activation dtype; fp64 stays fp64 (tests against the definition)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _heads_from_groups(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[..., g, n] -> [..., h, n]: head i reads group i // (h / g), as the scan maps them."""
    return t.repeat_interleave(heads // t.shape[-2], dim=-2)


def final_ssm_state(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The scan's state after the last position, from a zero state: x [b, l, h, p],
    dt [b, l, h] (after softplus), A [h], B [b, l, g, n] -> fp32 [b, h, p, n] (fp64 for fp64 x)."""
    compute = _compute_dtype(x)
    x, dt, A, B = x.to(compute), dt.to(compute), A.to(compute), B.to(compute)
    a = dt * A  # [b, l, h], log-decay of each position
    # Decay from after position t to the end: a suffix sum. Summed from the end (a reversed
    # cumsum, minus the position's own term) it stays exact for long prompts, where the
    # difference of two large prefix sums would lose the small ones.
    suffix = torch.flip(torch.cumsum(torch.flip(a, [1]), dim=1), [1]) - a
    weight = torch.exp(suffix) * dt  # [b, l, h]
    Bh = _heads_from_groups(B, x.shape[2])  # [b, l, h, n]
    return torch.einsum("blh,blhp,blhn->bhpn", weight, x, Bh)


def output_from_initial_state(ssm_state: torch.Tensor, C: torch.Tensor, log_decay: torch.Tensor) -> torch.Tensor:
    """What an initial state adds to the scan's output (the scan being linear in its state):
    y_t += exp(dt_1 A + ... + dt_t A) * state . C_t. ssm_state [b, h, p, n], C [b, l, g, n],
    log_decay [b, l, h] the cumulative sums of dt * A -> [b, l, h, p] in the state's dtype."""
    Ch = _heads_from_groups(C.to(ssm_state.dtype), ssm_state.shape[1])
    return torch.exp(log_decay.to(ssm_state.dtype))[..., None] * torch.einsum("bhpn,blhn->blhp", ssm_state, Ch)


def conv_state_of(xbc: torch.Tensor, d_conv: int) -> torch.Tensor:
    """The conv1d inputs a next token's convolution reads: the last d_conv - 1 positions of
    xbc [b, l, conv_dim] (before the convolution), zeros where the prompt is shorter, as
    the causal convolution pads -> [b, conv_dim, d_conv - 1] (oldest first)."""
    window = xbc[:, -(d_conv - 1):].transpose(1, 2)
    missing = d_conv - 1 - window.shape[2]
    return F.pad(window, (missing, 0)).contiguous() if missing else window.contiguous()


def conv_step(conv_state: torch.Tensor, xbc: torch.Tensor, weight: torch.Tensor,
              bias: Optional[torch.Tensor]) -> torch.Tensor:
    """One position of the causal conv1d + SiLU: conv_state [b, conv_dim, k-1] (updated in
    place: the oldest input leaves, ``xbc`` enters), xbc [b, conv_dim], weight [conv_dim, k],
    bias [conv_dim] -> [b, conv_dim] in xbc's dtype."""
    window = torch.cat([conv_state, xbc[:, :, None].to(conv_state.dtype)], dim=2)  # [b, conv_dim, k]
    conv_state.copy_(window[:, :, 1:])
    compute = _compute_dtype(xbc)
    out = (window.to(compute) * weight.to(compute)).sum(-1)
    if bias is not None:
        out = out + bias.to(compute)
    return F.silu(out).to(xbc.dtype)


def ssm_step(ssm_state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
             C: torch.Tensor, D: Optional[torch.Tensor]) -> torch.Tensor:
    """One position of the recurrence: ssm_state fp32 [b, h, p, n] (updated in place),
    x [b, h, p], dt [b, h] (after softplus), A [h], B/C [b, g, n], D [h] -> y [b, h, p] in
    the state's dtype."""
    heads, compute = x.shape[1], ssm_state.dtype
    x, dt = x.to(compute), dt.to(compute)
    Bh, Ch = _heads_from_groups(B.to(compute), heads), _heads_from_groups(C.to(compute), heads)
    decay = torch.exp(dt * A.to(compute))[:, :, None, None]
    ssm_state.mul_(decay).add_((dt[:, :, None] * x)[..., None] * Bh[:, :, None, :])
    y = torch.einsum("bhpn,bhn->bhp", ssm_state, Ch)
    if D is not None:
        y = y + x * D.to(compute)[:, None]
    return y
