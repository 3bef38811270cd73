"""The SSD (state-space duality) scan of Mamba-2 in plain PyTorch.

Shape legend (batch first inside the scan, as the mixer hands it over):
  b batch, l sequence, h heads, p head dim, g groups (h % g == 0), n state dim,
  c chunks, q positions in a chunk.

The recurrence, per head (head i reads group i // (h / g), contiguous groups):
  state_t = exp(dt_t * A) * state_{t-1} + dt_t * x_t (outer) B_t     state [p, n]
  y_t     = state_t . C_t + D * x_t

``ssd_sequential`` runs it step by step (the definition; slow, used by tests).
``ssd_chunked`` computes the same numbers in chunks of ``chunk_size`` positions: a
quadratic (attention-like) product inside each chunk, and the recurrence only across
chunk boundaries. Padding a sequence with dt = 0, x = 0 changes nothing (decay 1, no
input), which is how a length that is not a multiple of the chunk size is handled.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

Output = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


def _check_shapes(x, dt, A, B, C) -> None:
    b, l, h, _ = x.shape
    if dt.shape != (b, l, h) or A.shape != (h,):
        raise ValueError(f"SSD: dt must be [b, l, h] = {(b, l, h)} and A [h], got {tuple(dt.shape)}, {tuple(A.shape)}")
    if B.shape != C.shape or B.shape[:2] != (b, l) or h % B.shape[2]:
        raise ValueError(
            f"SSD: B and C must be [b, l, g, n] with heads {h} divisible by groups, got "
            f"{tuple(B.shape)} and {tuple(C.shape)}"
        )


def _heads_from_groups(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[b, l, g, n] -> [b, l, h, n]: head i reads group i // (h / g)."""
    return t.repeat_interleave(heads // t.shape[2], dim=2)


def ssd_sequential(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    initial_states: Optional[torch.Tensor] = None,
    return_final_states: bool = False,
) -> Output:
    """The recurrence one position at a time. x [b, l, h, p], dt [b, l, h] (already
    softplus'ed), A [h] (negative), B/C [b, l, g, n], D [h] or None, initial_states
    [b, h, p, n] or None -> y [b, l, h, p] (and the final state [b, h, p, n])."""
    _check_shapes(x, dt, A, B, C)
    b, l, h, p = x.shape
    Bh, Ch = _heads_from_groups(B, h), _heads_from_groups(C, h)
    state = x.new_zeros(b, h, p, B.shape[-1]) if initial_states is None else initial_states
    ys = []
    for t in range(l):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        inp = (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]
        state = decay * state + inp
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + x * D[:, None]
    return (y, state) if return_final_states else y


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """[..., q] -> [..., q, q]: entry (i, j) is a[j+1] + ... + a[i] for j <= i, -inf above
    the diagonal (so exp gives the causal decay matrix). Sums of a masked repeat, not a
    difference of cumsums, keep it exact for long chunks."""
    q = a.shape[-1]
    a = a[..., None].expand(*a.shape, q)
    strict = torch.tril(torch.ones(q, q, dtype=torch.bool, device=a.device), diagonal=-1)
    a = a.masked_fill(~strict, 0)
    sums = torch.cumsum(a, dim=-2)
    causal = torch.tril(torch.ones(q, q, dtype=torch.bool, device=a.device))
    return sums.masked_fill(~causal, float("-inf"))


def _segsum_from_cumsum(a_cum: torch.Tensor) -> torch.Tensor:
    """[..., q] cumulative sums -> [..., q, q]: a_cum[i] - a_cum[j] for j <= i, -inf above
    the diagonal. Within one chunk the difference of cumsums is accurate enough (fp32
    compute, chunk-length sums) and needs no [q, q] cumsum."""
    diff = a_cum[..., :, None] - a_cum[..., None, :]
    q = a_cum.shape[-1]
    causal = torch.tril(torch.ones(q, q, dtype=torch.bool, device=a_cum.device))
    return diff.masked_fill(~causal, float("-inf"))


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: Optional[torch.Tensor] = None,
    initial_states: Optional[torch.Tensor] = None,
    return_final_states: bool = False,
) -> Output:
    """Same contract as ``ssd_sequential``, computed chunk by chunk (differentiable)."""
    _check_shapes(x, dt, A, B, C)
    if chunk_size < 1:
        raise ValueError(f"SSD chunk size must be >= 1, got {chunk_size}")
    b, l, h, p = x.shape
    pad = (-l) % chunk_size
    x_in = x
    if pad:
        # dt = 0 on padded positions: decay exp(0) = 1 and no input, the state passes through.
        x, dt = F.pad(x, (0, 0, 0, 0, 0, pad)), F.pad(dt, (0, 0, 0, pad))
        B, C = F.pad(B, (0, 0, 0, 0, 0, pad)), F.pad(C, (0, 0, 0, 0, 0, pad))
    c, q, g = (l + pad) // chunk_size, chunk_size, B.shape[2]
    r = h // g  # heads per group: heads are viewed as [g, r], head i = (i // r, i % r)
    x_c = x.reshape(b, c, q, g, r, p)
    B_c = B.reshape(b, c, q, g, -1)
    C_c = C.reshape(b, c, q, g, -1)
    dt_c = dt.reshape(b, c, q, g, r)
    a_cum = torch.cumsum((dt * A).reshape(b, c, q, g, r).permute(0, 3, 4, 1, 2), dim=-1)  # [b, g, r, c, q]

    # 1. Inside each chunk: y_i = sum_{j<=i} (C_i . B_j) exp(a_{j+1..i}) dt_j x_j. C.B is
    #    computed once per group, not per head.
    cb = torch.einsum("bcign,bcjgn->bgcij", C_c, B_c)
    scores = cb[:, :, None] * torch.exp(_segsum_from_cumsum(a_cum))  # [b, g, r, c, q, q]
    y_diag = torch.einsum("bgrcij,bcjgr,bcjgrp->bcigrp", scores, dt_c, x_c)

    # 2. The state each chunk leaves behind, from its own inputs only.
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)  # [b, g, r, c, q]
    chunk_states = torch.einsum("bcjgn,bgrcj,bcjgr,bcjgrp->bcgrpn", B_c, decay_to_end, dt_c, x_c)

    # 3. Carry states across chunks: state entering chunk k (k = 0 is the initial state).
    n = B.shape[-1]
    if initial_states is None:
        initial_states = x.new_zeros(b, h, p, n)
    states = torch.cat([initial_states.reshape(b, 1, g, r, p, n), chunk_states], dim=1)  # [b, c+1, g, r, p, n]
    chunk_decay = torch.exp(_segsum(F.pad(a_cum[..., -1], (1, 0))))  # [b, g, r, c+1, c+1]
    states = torch.einsum("bgrzc,bcgrpn->bzgrpn", chunk_decay, states)
    entering, final = states[:, :-1], states[:, -1].reshape(b, h, p, n)

    # 4. What the entering state contributes at each position of the chunk.
    y_off = torch.einsum("bcign,bcgrpn,bgrci->bcigrp", C_c, entering, torch.exp(a_cum))
    y = (y_diag + y_off).reshape(b, c * q, h, p)[:, :l]
    if D is not None:
        y = y + x_in * D[:, None]
    return (y, final) if return_final_states else y
