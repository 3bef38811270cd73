"""Triton kernels of the SSD chunked scan, backward. Notation as in ``ssd_triton_forward``;
dy is the gradient of y, M_ij = (C_i . B_j) exp(s_i - s_j) for j <= i (0 above), and
dS_out[c] the gradient of the state leaving chunk c (= of the state entering chunk c+1).

  state gradients   G[c]        = sum_i exp(s_i) dy_i (outer) C_i      (chunk_state_kernel)
                    dS_out[last] = grad of the final state (or 0)
                    dS_out[c-1] = G[c] + exp(s_last[c]) dS_out[c];  grad initial = the last carry
  x (dx_kernel)     u_j  = sum_{i >= j} M_ij dy_i + exp(s_last - s_j) dS_out B_j
                    dx_j = dt_j u_j + D dy_j;   dt_j explicitly: x_j . u_j
  B (dx_kernel)     dB_j = sum_i W_ij C_i + exp(s_last - s_j) dt_j dS_out^T x_j,
                    with W_ij = (dy_i . x_j) exp(s_i - s_j) dt_j for j <= i
  C (dc_kernel)     dC_i = sum_j W_ij B_j + exp(s_i) S_in^T dy_i

The heads of a group share B and C, so their dB and dC add up: one program walks a slice
of HP heads of its group and sums them in registers. With enough programs for the GPU the
slice is the whole group and the sum is the gradient; otherwise the launcher adds the
group's slices (``ssd_triton._heads_per_program``).

The decays depend on dt and A through s. Writing ds_k for the gradient of s_k, every term
exp(s_i - s_j) adds its (value x upstream) to ds_i and takes it from ds_j; the chunk-state
weights exp(s_last - s_j) and the carry exp(s_last) add to ds_last. Since s_k sums a_0..a_k,
da_k = sum_{i >= k} ds_i, then grad dt_k += A da_k and grad A += sum_k dt_k da_k (dt_kernel).
The per-position pieces go through fp32 buffers [b, h, n_chunks, Q]: ds (both sides of the
products), e (the chunk-state terms, summed onto ds_last), ddt (the explicit dt terms).
"""

from __future__ import annotations

import triton
import triton.language as tl

from megatron.core.ssm.ssd_triton_forward import causal_decay, mm


@triton.jit
def state_pass_bwd_kernel(grad_ptr, states_ptr, acum_ptr, dfinal_ptr, dinit_ptr, dslast_ptr, NC, H, PN, NBLK,
                          Q: tl.constexpr, HAS_DFINAL: tl.constexpr, BLOCK: tl.constexpr):
    """In place over ``grad``: G[c] in, dS_out[c] out, walking the chunks backwards. Also the
    carry's share of ds_last (partial sums per state block, [b, h, c, NBLK]) and the initial
    state's gradient."""
    b, h, blk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    e = blk * BLOCK + tl.arange(0, BLOCK)
    ok = e < PN
    if HAS_DFINAL:
        cur = tl.load(dfinal_ptr + (b * H + h) * PN + e, mask=ok, other=0.0).to(tl.float32)
    else:
        cur = tl.zeros((BLOCK,), dtype=tl.float32)
    # The next (earlier) chunk's inputs are loaded a step ahead, as in the forward pass.
    last = ((b * NC + NC - 1) * H + h) * PN + e
    entering = tl.load(states_ptr + last, mask=ok, other=0.0)
    from_output = tl.load(grad_ptr + last, mask=ok, other=0.0)
    decay = tl.exp(tl.load(acum_ptr + ((b * H + h) * NC + NC - 1) * Q + Q - 1))
    for k in range(0, NC):
        c = NC - 1 - k
        off = ((b * NC + c) * H + h) * PN + e
        cp = (c + NC - 1) % NC  # after the first chunk a harmless reload of the last, unused
        prev = ((b * NC + cp) * H + h) * PN + e
        entering_next = tl.load(states_ptr + prev, mask=ok, other=0.0)
        from_output_next = tl.load(grad_ptr + prev, mask=ok, other=0.0)
        decay_next = tl.exp(tl.load(acum_ptr + ((b * H + h) * NC + cp) * Q + Q - 1))
        tl.store(dslast_ptr + ((b * H + h) * NC + c) * NBLK + blk, decay * tl.sum(entering * cur, axis=0))
        tl.store(grad_ptr + off, cur, mask=ok)
        cur = from_output + decay * cur
        entering, from_output, decay = entering_next, from_output_next, decay_next
    tl.store(dinit_ptr + (b * H + h) * PN + e, cur, mask=ok)


@triton.jit
def dx_kernel(x_ptr, B_ptr, C_ptr, dt_ptr, D_ptr, dy_ptr, acum_ptr, dsout_ptr,
              dx_ptr, dB_ptr, ds_ptr, e_ptr, ddt_ptr, dD_ptr, L, NC, H, R, P, N, HP,
              sx_b, sx_l, sx_h, sx_p, sb_b, sb_l, sb_g, sb_n, sc_b, sc_l, sc_g, sc_n, s_dt_b, s_dt_l, s_dt_h,
              Q: tl.constexpr, HAS_D: tl.constexpr, F32: tl.constexpr,
              BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """For one block of source positions j of a chunk and a slice of HP heads of one group,
    head by head: dx_j, the explicit dt_j term, the j side of ds and the chunk-state terms
    e_j, and (with D) the block's partial sum of dy . x for D's gradient ([b, h, n_chunks,
    Q / BLOCK_Q]); then the slice's dB_j, summed over its heads in registers
    ([b, l, H / HP, N], contiguous; the caller adds a group's slices). dy is contiguous
    [b, l, h, P]."""
    pid_bc, k, pid_j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    g = k * HP // R
    b, c = pid_bc // NC, pid_bc % NC
    j = pid_j * BLOCK_Q + tl.arange(0, BLOCK_Q)
    tj = c * Q + j
    ok_j = tj < L
    p = tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    p_ok, n_ok = p < P, n < N
    b_j = tl.load(B_ptr + b * sb_b + tj[:, None] * sb_l + g * sb_g + n[None, :] * sb_n,
                  mask=ok_j[:, None] & n_ok[None, :], other=0.0)
    db = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.float32)
    for r in range(0, HP):
        h = k * HP + r
        acum = acum_ptr + ((b * H + h) * NC + c) * Q
        s_j = tl.load(acum + j)
        s_last = tl.load(acum + Q - 1)
        dt_j = tl.load(dt_ptr + b * s_dt_b + tj * s_dt_l + h * s_dt_h, mask=ok_j, other=0.0).to(tl.float32)
        x_j = tl.load(x_ptr + b * sx_b + tj[:, None] * sx_l + h * sx_h + p[None, :] * sx_p,
                      mask=ok_j[:, None] & p_ok[None, :], other=0.0)
        u = tl.zeros((BLOCK_Q, BLOCK_P), dtype=tl.float32)
        ds = tl.zeros((BLOCK_Q,), dtype=tl.float32)
        for i0 in range(pid_j * BLOCK_Q, Q, BLOCK_Q):
            i = i0 + tl.arange(0, BLOCK_Q)
            ti = c * Q + i
            ok_i = ti < L
            s_i = tl.load(acum + i)
            c_i = tl.load(C_ptr + b * sc_b + ti[:, None] * sc_l + g * sc_g + n[None, :] * sc_n,
                          mask=ok_i[:, None] & n_ok[None, :], other=0.0)
            dy_i = tl.load(dy_ptr + ((b * L + ti[:, None]) * H + h) * P + p[None, :],
                           mask=ok_i[:, None] & p_ok[None, :], other=0.0)
            decay_t = tl.trans(causal_decay(s_i, s_j, i, j))  # [j, i]
            cb_t = mm(b_j, tl.trans(c_i), F32)
            u += mm(cb_t * decay_t, dy_i, F32)
            w_t = mm(x_j, tl.trans(dy_i), F32) * decay_t * dt_j[:, None]
            db += mm(w_t, c_i, F32)
            ds -= tl.sum(w_t * cb_t, axis=1)
        # The chunk's own state: T = sum_j exp(s_last - s_j) dt_j x_j (outer) B_j, gradient dS_out.
        ds_out = dsout_ptr + ((b * NC + c) * H + h) * P * N
        st_mask = p_ok[:, None] & n_ok[None, :]
        dso = tl.load(ds_out + p[:, None] * N + n[None, :], mask=st_mask, other=0.0)  # [P, N]
        to_end = tl.exp(s_last - s_j)
        v = mm(b_j, tl.trans(dso), F32) * to_end[:, None]
        u += v
        db += mm(x_j, dso, F32) * (to_end * dt_j)[:, None]
        x32 = x_j.to(tl.float32)
        e = dt_j * tl.sum(x32 * v, axis=1)
        buf = ((b * H + h) * NC + c) * Q + j
        tl.store(ds_ptr + buf, ds - e)
        tl.store(e_ptr + buf, e)
        tl.store(ddt_ptr + buf, tl.sum(x32 * u, axis=1))
        dx = dt_j[:, None] * u
        out = ((b * L + tj[:, None]) * H + h)
        mask = ok_j[:, None] & p_ok[None, :]
        if HAS_D:
            dy_j = tl.load(dy_ptr + out * P + p[None, :], mask=mask, other=0.0).to(tl.float32)
            dx += tl.load(D_ptr + h).to(tl.float32) * dy_j
            dD_part = tl.sum(tl.sum(dy_j * x32, axis=1), axis=0)
            tl.store(dD_ptr + ((b * H + h) * NC + c) * tl.num_programs(2) + pid_j, dD_part)
        tl.store(dx_ptr + out * P + p[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dB_ptr + ((b * L + tj[:, None]) * tl.num_programs(1) + k) * N + n[None, :], db.to(dB_ptr.dtype.element_ty),
             mask=ok_j[:, None] & n_ok[None, :])


@triton.jit
def dc_kernel(x_ptr, B_ptr, C_ptr, dt_ptr, dy_ptr, acum_ptr, states_ptr, dC_ptr, ds_ptr, L, NC, H, R, P, N, HP,
              sx_b, sx_l, sx_h, sx_p, sb_b, sb_l, sb_g, sb_n, sc_b, sc_l, sc_g, sc_n, s_dt_b, s_dt_l, s_dt_h,
              Q: tl.constexpr, F32: tl.constexpr,
              BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """For one block of output positions i of a chunk and a slice of HP heads of one group,
    head by head: the i side of ds, added to what dx_kernel stored there; then the slice's
    dC_i, summed over its heads in registers ([b, l, H / HP, N], as dx_kernel's dB)."""
    pid_bc, k, pid_i = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    g = k * HP // R
    b, c = pid_bc // NC, pid_bc % NC
    i = pid_i * BLOCK_Q + tl.arange(0, BLOCK_Q)
    ti = c * Q + i
    ok_i = ti < L
    p = tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    p_ok, n_ok = p < P, n < N
    c_i = tl.load(C_ptr + b * sc_b + ti[:, None] * sc_l + g * sc_g + n[None, :] * sc_n,
                  mask=ok_i[:, None] & n_ok[None, :], other=0.0)
    dc = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.float32)
    for r in range(0, HP):
        h = k * HP + r
        acum = acum_ptr + ((b * H + h) * NC + c) * Q
        s_i = tl.load(acum + i)
        dy_i = tl.load(dy_ptr + ((b * L + ti[:, None]) * H + h) * P + p[None, :],
                       mask=ok_i[:, None] & p_ok[None, :], other=0.0)
        # The entering state's term y_off_i = exp(s_i) S_in C_i.
        state = tl.load(states_ptr + ((b * NC + c) * H + h) * P * N + p[:, None] * N + n[None, :],
                        mask=p_ok[:, None] & n_ok[None, :], other=0.0)  # [P, N]
        grow = tl.exp(s_i)
        dc += mm(dy_i, state, F32) * grow[:, None]
        y_off = mm(c_i, tl.trans(state), F32) * grow[:, None]
        ds = tl.sum(dy_i.to(tl.float32) * y_off, axis=1)
        for j0 in range(0, (pid_i + 1) * BLOCK_Q, BLOCK_Q):
            j = j0 + tl.arange(0, BLOCK_Q)
            tj = c * Q + j
            ok_j = tj < L
            s_j = tl.load(acum + j)
            dt_j = tl.load(dt_ptr + b * s_dt_b + tj * s_dt_l + h * s_dt_h, mask=ok_j, other=0.0).to(tl.float32)
            b_j = tl.load(B_ptr + b * sb_b + tj[:, None] * sb_l + g * sb_g + n[None, :] * sb_n,
                          mask=ok_j[:, None] & n_ok[None, :], other=0.0)
            x_t = tl.load(x_ptr + b * sx_b + tj[None, :] * sx_l + h * sx_h + p[:, None] * sx_p,
                          mask=ok_j[None, :] & p_ok[:, None], other=0.0)  # [P, BLOCK_Q]
            cb = mm(c_i, tl.trans(b_j), F32)
            w = mm(dy_i, x_t, F32) * causal_decay(s_i, s_j, i, j) * dt_j[None, :]
            dc += mm(w, b_j, F32)
            ds += tl.sum(w * cb, axis=1)
        buf = ((b * H + h) * NC + c) * Q + i
        tl.store(ds_ptr + buf, tl.load(ds_ptr + buf) + ds)
    tl.store(dC_ptr + ((b * L + ti[:, None]) * tl.num_programs(1) + k) * N + n[None, :], dc.to(dC_ptr.dtype.element_ty),
             mask=ok_i[:, None] & n_ok[None, :])


@triton.jit
def dt_kernel(dt_ptr, A_ptr, ds_ptr, e_ptr, ddt_expl_ptr, dslast_ptr, ddt_ptr, dA_ptr, L, NC, H, NBLK,
              s_dt_b, s_dt_l, s_dt_h, Q: tl.constexpr, BLOCK_BLK: tl.constexpr):
    """da = the reverse cumulative sum of ds over the chunk (plus ds_last, which every
    position feeds); grad dt = explicit term + A da; per-(b, h, c) partial of grad A."""
    pid_bc, h = tl.program_id(0), tl.program_id(1)
    b, c = pid_bc // NC, pid_bc % NC
    q = tl.arange(0, Q)
    t = c * Q + q
    ok = t < L
    row = (b * H + h) * NC + c
    ds = tl.load(ds_ptr + row * Q + q)
    blk = tl.arange(0, BLOCK_BLK)
    ds_last = tl.sum(tl.load(e_ptr + row * Q + q), axis=0) + \
        tl.sum(tl.load(dslast_ptr + row * NBLK + blk, mask=blk < NBLK, other=0.0), axis=0)
    da = tl.sum(ds, axis=0) - tl.cumsum(ds, axis=0) + ds + ds_last
    dt = tl.load(dt_ptr + b * s_dt_b + t * s_dt_l + h * s_dt_h, mask=ok, other=0.0).to(tl.float32)
    ddt = tl.load(ddt_expl_ptr + row * Q + q) + tl.load(A_ptr + h).to(tl.float32) * da
    tl.store(ddt_ptr + (b * L + t) * H + h, ddt.to(ddt_ptr.dtype.element_ty), mask=ok)
    tl.store(dA_ptr + row, tl.sum(dt * da, axis=0))
