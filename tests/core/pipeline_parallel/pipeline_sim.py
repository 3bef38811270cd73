"""Simulate every rank's pipeline plan together, with strict rendezvous p2p.

Each ``Exchange`` posts its sends and receives (activation flow first, as the executor
does) and completes only when every one of them is matched by the peer, messages on a
directed pair of ranks matching in posting order (NCCL's and gloo's rule). The
simulation fails on a deadlock, on a message that reaches the wrong chunk or micro-batch,
on a backward before its forward, and on any forward/backward missing or repeated.
"""

from __future__ import annotations

from collections import defaultdict, deque

from megatron.core.pipeline_parallel.schedule_table import Step, pipeline_plan


class PlanError(AssertionError):
    pass


def _ops(rank, pp, ex, by_direction=False):
    nxt, prv = (rank + 1) % pp, (rank - 1) % pp
    ops = []
    if ex.send_next is not None:
        ops.append(("send", nxt, ("act",) + tuple(ex.send_next)))
    if ex.recv_prev is not None:
        ops.append(("recv", prv, ("act", ex.recv_prev)))
    if ex.send_prev is not None:
        ops.append(("send", prv, ("grad",) + tuple(ex.send_prev)))
    if ex.recv_next is not None:
        ops.append(("recv", nxt, ("grad", ex.recv_next)))
    if by_direction:
        # send to previous, receive from previous, send to next, receive from next: a
        # naive order, for the negative test.
        rank_of = {("send", "grad"): 0, ("recv", "act"): 1, ("send", "act"): 2, ("recv", "grad"): 3}
        ops.sort(key=lambda o: rank_of[(o[0], o[2][0])])
    return ops


def simulate(pp, m, vpp=None, group_size=None, forward_only=False, plans=None, by_direction=False,
             overlap_p2p=False):
    """Run the plans; return {rank: [(kind, mb, chunk), ...]} in execution order.

    An exchange blocks its rank until it completes. With ``overlap_p2p`` the executor only
    posts it and waits later, but its communication stream still runs the exchanges one
    after the other in plan order, so they complete in the same order as here: a plan that
    cannot deadlock here cannot deadlock there."""
    vpp_n = vpp or 1
    plans = plans or [pipeline_plan(pp, r, m, vpp, group_size, forward_only, overlap_p2p) for r in range(pp)]
    pos = [0] * pp
    posted = [None] * pp  # per rank: list of (op, channel index) of the current exchange
    sent = defaultdict(list)  # (src, dst) -> messages
    recvs = defaultdict(int)  # (src, dst) -> receives posted
    act_q = [[deque() for _ in range(vpp_n)] for _ in range(pp)]
    grad_q = [[deque() for _ in range(vpp_n)] for _ in range(pp)]
    done_f, done_b = set(), set()
    executed = {r: [] for r in range(pp)}

    def vstage(r, c):
        return c * pp + r

    last_vs = pp * vpp_n - 1

    def step(r, s):
        key = (r, s.microbatch, s.chunk)
        v = vstage(r, s.chunk)
        if s.kind == "F":
            if key in done_f:
                raise PlanError(f"rank {r}: forward {key} twice")
            if v != 0:
                if not act_q[r][s.chunk] or act_q[r][s.chunk].popleft() != s.microbatch:
                    raise PlanError(f"rank {r}: forward mb {s.microbatch} chunk {s.chunk} lacks its input")
            done_f.add(key)
        else:
            if key not in done_f or key in done_b:
                raise PlanError(f"rank {r}: backward {key} before forward or twice")
            if v != last_vs:
                if not grad_q[r][s.chunk] or grad_q[r][s.chunk].popleft() != s.microbatch:
                    raise PlanError(f"rank {r}: backward mb {s.microbatch} chunk {s.chunk} lacks its grad")
            done_b.add(key)
        executed[r].append((s.kind, s.microbatch, s.chunk))

    def try_exchange(r, ex):
        if posted[r] is None:
            entries = []
            for op in _ops(r, pp, ex, by_direction):
                kind, peer, payload = op
                if kind == "send":
                    if payload[0] == "act" and (r, payload[1], payload[2]) not in done_f:
                        raise PlanError(f"rank {r}: sends activation of {payload[1:]} before computing it")
                    if payload[0] == "grad" and (r, payload[1], payload[2]) not in done_b:
                        raise PlanError(f"rank {r}: sends grad of {payload[1:]} before computing it")
                    ch = (r, peer)
                    entries.append((op, len(sent[ch])))
                    sent[ch].append(payload)
                else:
                    ch = (peer, r)
                    entries.append((op, recvs[ch]))
                    recvs[ch] += 1
            posted[r] = entries
        for (kind, peer, payload), idx in posted[r]:
            if kind == "send" and recvs[(r, peer)] <= idx:
                return False
            if kind == "recv" and len(sent[(peer, r)]) <= idx:
                return False
        for (kind, peer, payload), idx in posted[r]:
            if kind != "recv":
                continue
            msg = sent[(peer, r)][idx]
            flow, chunk = payload
            if msg[0] != flow:
                raise PlanError(f"rank {r}: expected {flow} from {peer}, got {msg}")
            src_v, dst_v = vstage(peer, msg[2]), vstage(r, chunk)
            if dst_v != src_v + (1 if flow == "act" else -1):
                raise PlanError(f"rank {r}: {msg} from rank {peer} delivered to chunk {chunk}")
            (act_q if flow == "act" else grad_q)[r][chunk].append(msg[1])
        posted[r] = None
        return True

    progress = True
    while progress:
        progress = False
        for r in range(pp):
            while pos[r] < len(plans[r]):
                a = plans[r][pos[r]]
                if isinstance(a, Step):
                    step(r, a)
                elif not try_exchange(r, a):
                    break
                pos[r] += 1
                progress = True
    if any(pos[r] < len(plans[r]) for r in range(pp)):
        raise PlanError(f"deadlock at positions {pos} of {[len(p) for p in plans]}")
    _check_all_consumed(pp, m, vpp_n, forward_only, done_f, done_b, act_q, grad_q)
    return executed


def _check_all_consumed(pp, m, vpp_n, forward_only, done_f, done_b, act_q, grad_q):
    """Every forward (and backward) ran once and no message was left unread."""
    expected = {(r, mb, c) for r in range(pp) for mb in range(m) for c in range(vpp_n)}
    if done_f != expected:
        raise PlanError("missing forwards")
    if done_b != (set() if forward_only else expected):
        raise PlanError("missing or extra backwards")
    for r in range(pp):
        if any(act_q[r][c] or grad_q[r][c] for c in range(vpp_n)):
            raise PlanError(f"rank {r}: unconsumed messages")
