"""Triton kernels of the SSD chunked scan, forward (and the chunk-state product the backward
reuses). Imported only where Triton is; ``ssd_triton`` launches them.

Per batch b, head h (reading group g = h // R, R heads per group) and chunk c of Q positions,
with a_t = dt_t * A_h and s the cumulative sum of a inside the chunk (s_i = a_0 + ... + a_i):

  chunk state      T[c]     = sum_j exp(s_last - s_j) dt_j x_j (outer) B_j          [P, N]
  state passing    S_in[0]  = initial state (or 0)
                   S_in[c+1] = exp(s_last[c]) S_in[c] + T[c]    (S_in[n_chunks] is the final state)
  output           y_i      = sum_{j <= i} (C_i . B_j) exp(s_i - s_j) dt_j x_j      (inside the chunk)
                            + exp(s_i) S_in[c] C_i + D_h x_i                        (from earlier chunks)

Positions past the sequence end load dt = x = B = C = 0: decay 1 and no input, so the
padded tail of the last chunk changes nothing. Products run as ``tl.dot`` on bf16 operands
(fp32 inputs: fp32 operands at IEEE precision), always accumulating in fp32; decays, the
cumulative sums and the carried states stay fp32.

Buffers: acum [b, h, n_chunks, Q] fp32; states [b, n_chunks, h, P, N] fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def mm(a, b, F32: tl.constexpr):
    """a @ b with fp32 accumulation: fp32 operands at IEEE precision, else bf16 operands."""
    if F32:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    return out


@triton.jit
def causal_decay(s_rows, s_cols, rows, cols):
    """exp(s_rows[r] - s_cols[k]) where rows[r] >= cols[k] (the later position decays from the
    earlier one), 0 elsewhere; exp(-inf) keeps the masked entries from overflowing."""
    diff = s_rows[:, None] - s_cols[None, :]
    return tl.exp(tl.where(rows[:, None] >= cols[None, :], diff, float("-inf")))


@triton.jit
def chunk_cumsum_kernel(dt_ptr, A_ptr, acum_ptr, L, NC, H, s_dt_b, s_dt_l, s_dt_h, Q: tl.constexpr):
    """acum[b, h, c, :] = cumsum(dt * A) over the chunk's positions."""
    pid_bc, h = tl.program_id(0), tl.program_id(1)
    b, c = pid_bc // NC, pid_bc % NC
    q = tl.arange(0, Q)
    t = c * Q + q
    dt = tl.load(dt_ptr + b * s_dt_b + t * s_dt_l + h * s_dt_h, mask=t < L, other=0.0).to(tl.float32)
    a = dt * tl.load(A_ptr + h).to(tl.float32)
    tl.store(acum_ptr + ((b * H + h) * NC + c) * Q + q, tl.cumsum(a, axis=0))


@triton.jit
def chunk_state_kernel(u_ptr, v_ptr, acum_ptr, dt_ptr, out_ptr, L, NC, H, R, P, N,
                       su_b, su_l, su_h, su_p, sv_b, sv_l, sv_g, sv_n, s_dt_b, s_dt_l, s_dt_h,
                       Q: tl.constexpr, FROM_OUTPUT: tl.constexpr, F32: tl.constexpr,
                       BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[b, c, h] = sum_j w_j u_j (outer) v_j over the chunk, [P, N] in fp32.

    Forward (FROM_OUTPUT False): u = x, v = B, w_j = exp(s_last - s_j) dt_j: the state the
    chunk's own inputs leave behind. Backward (FROM_OUTPUT True): u = grad y, v = C,
    w_j = exp(s_j): the gradient the chunk's outputs send to the state entering it.
    """
    pid_bc, h, pid_pn = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, c = pid_bc // NC, pid_bc % NC
    g = h // R
    n_blocks_n = tl.cdiv(N, BLOCK_N)
    p = (pid_pn // n_blocks_n) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = (pid_pn % n_blocks_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    acum = acum_ptr + ((b * H + h) * NC + c) * Q
    s_last = tl.load(acum + Q - 1)
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for j0 in range(0, Q, BLOCK_Q):
        j = j0 + tl.arange(0, BLOCK_Q)
        t = c * Q + j
        ok = t < L
        s = tl.load(acum + j)
        if FROM_OUTPUT:
            w = tl.exp(s)
        else:
            dt = tl.load(dt_ptr + b * s_dt_b + t * s_dt_l + h * s_dt_h, mask=ok, other=0.0).to(tl.float32)
            w = tl.exp(s_last - s) * dt
        u_t = tl.load(u_ptr + b * su_b + t[None, :] * su_l + h * su_h + p[:, None] * su_p,
                      mask=ok[None, :] & (p < P)[:, None], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + b * sv_b + t[:, None] * sv_l + g * sv_g + n[None, :] * sv_n,
                    mask=ok[:, None] & (n < N)[None, :], other=0.0)
        acc += mm(u_t * w[None, :], v, F32)
    out = out_ptr + ((b * NC + c) * H + h) * P * N
    tl.store(out + p[:, None] * N + n[None, :], acc, mask=(p < P)[:, None] & (n < N)[None, :])


@triton.jit
def state_pass_fwd_kernel(states_ptr, acum_ptr, init_ptr, final_ptr, NC, H, PN,
                          Q: tl.constexpr, HAS_INIT: tl.constexpr, BLOCK: tl.constexpr):
    """In place over ``states``: chunk c's own state T[c] in, the state entering chunk c out.
    One program per (b, h, block of the P*N state entries), walking the chunks in order."""
    b, h, blk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    e = blk * BLOCK + tl.arange(0, BLOCK)
    ok = e < PN
    if HAS_INIT:
        cur = tl.load(init_ptr + (b * H + h) * PN + e, mask=ok, other=0.0).to(tl.float32)
    else:
        cur = tl.zeros((BLOCK,), dtype=tl.float32)
    # The next chunk's state and decay are loaded a step ahead: they do not depend on the
    # carry, so their latency overlaps this step's store and update.
    own = tl.load(states_ptr + (b * NC * H + h) * PN + e, mask=ok, other=0.0)
    decay = tl.exp(tl.load(acum_ptr + (b * H + h) * NC * Q + Q - 1))
    for c in range(0, NC):
        off = ((b * NC + c) * H + h) * PN + e
        cn = (c + 1) % NC  # after the last chunk a harmless reload of the first, unused
        own_next = tl.load(states_ptr + ((b * NC + cn) * H + h) * PN + e, mask=ok, other=0.0)
        decay_next = tl.exp(tl.load(acum_ptr + ((b * H + h) * NC + cn) * Q + Q - 1))
        tl.store(states_ptr + off, cur, mask=ok)
        cur = decay * cur + own
        own, decay = own_next, decay_next
    tl.store(final_ptr + (b * H + h) * PN + e, cur, mask=ok)


@triton.jit
def chunk_output_kernel(x_ptr, B_ptr, C_ptr, dt_ptr, D_ptr, acum_ptr, states_ptr, y_ptr, L, NC, H, R, P, N,
                        sx_b, sx_l, sx_h, sx_p, sb_b, sb_l, sb_g, sb_n, sc_b, sc_l, sc_g, sc_n,
                        s_dt_b, s_dt_l, s_dt_h,
                        Q: tl.constexpr, HAS_D: tl.constexpr, F32: tl.constexpr,
                        BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """y for one block of BLOCK_Q positions of a chunk and one head (all P channels):
    the entering state's term, then the causal intra-chunk product block by block."""
    pid_bc, h, pid_i = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, c = pid_bc // NC, pid_bc % NC
    g = h // R
    i = pid_i * BLOCK_Q + tl.arange(0, BLOCK_Q)
    ti = c * Q + i
    ok_i = ti < L
    p = tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    p_ok, n_ok = p < P, n < N
    acum = acum_ptr + ((b * H + h) * NC + c) * Q
    s_i = tl.load(acum + i)
    c_i = tl.load(C_ptr + b * sc_b + ti[:, None] * sc_l + g * sc_g + n[None, :] * sc_n,
                  mask=ok_i[:, None] & n_ok[None, :], other=0.0)
    state_t = tl.load(states_ptr + ((b * NC + c) * H + h) * P * N + p[None, :] * N + n[:, None],
                      mask=n_ok[:, None] & p_ok[None, :], other=0.0)  # [N, P]
    acc = mm(c_i, state_t, F32) * tl.exp(s_i)[:, None]
    for j0 in range(0, (pid_i + 1) * BLOCK_Q, BLOCK_Q):
        j = j0 + tl.arange(0, BLOCK_Q)
        tj = c * Q + j
        ok_j = tj < L
        s_j = tl.load(acum + j)
        dt_j = tl.load(dt_ptr + b * s_dt_b + tj * s_dt_l + h * s_dt_h, mask=ok_j, other=0.0).to(tl.float32)
        b_t = tl.load(B_ptr + b * sb_b + tj[None, :] * sb_l + g * sb_g + n[:, None] * sb_n,
                      mask=ok_j[None, :] & n_ok[:, None], other=0.0)  # [N, BLOCK_Q]
        scores = mm(c_i, b_t, F32) * causal_decay(s_i, s_j, i, j) * dt_j[None, :]
        x_j = tl.load(x_ptr + b * sx_b + tj[:, None] * sx_l + h * sx_h + p[None, :] * sx_p,
                      mask=ok_j[:, None] & p_ok[None, :], other=0.0)
        acc += mm(scores, x_j, F32)
    x_i_ptrs = b * sx_b + ti[:, None] * sx_l + h * sx_h + p[None, :] * sx_p
    mask = ok_i[:, None] & p_ok[None, :]
    if HAS_D:
        acc += tl.load(D_ptr + h).to(tl.float32) * tl.load(x_ptr + x_i_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + ((b * L + ti[:, None]) * H + h) * P + p[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)
