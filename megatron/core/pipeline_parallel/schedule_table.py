"""Pure pipeline schedules: for one rank, the ordered compute steps and the exchanges.

No tensors and no communication here; ``schedules.py`` executes what these functions
plan. A plan is a list of ``Step`` (run forward ``F`` or backward ``B`` of one micro-batch
on one model chunk) and ``Exchange`` (one batched send/receive with the neighbouring
stages). Within an exchange, the activation flow (send to next, receive from previous) is
posted before the gradient flow (send to previous, receive from next), on every rank, so
that with two stages -- where "next" and "previous" are the same peer -- both sides
match their messages in the same order.

1F1B (one chunk): stage r runs ``min(PP - r - 1, M)`` warmup forwards, then alternates one
forward and one backward, then drains the remaining backwards.

Interleaved 1F1B (VPP chunks): micro-batches go through the chunks in groups of G
(``--microbatch-group-size-per-virtual-pipeline-stage``): forwards run micro-batches
0..G-1 on chunk 0, then on chunk 1, ..., then the next group; backwards follow the same
table with the chunks reversed. Warmup = ``(PP - r - 1) * 2 + (VPP - 1) * G`` forwards,
capped at ``M * VPP``. Requires ``PP <= G <= M`` and ``M % G`` either 0 or at least PP.

With p2p overlap (``overlap_p2p``, Megatron's ``--overlap-p2p-communication``, interleaved
only) no exchange mixes the two flows: each steady-state round becomes forward, activation
exchange (send the output, receive the next input), backward, gradient exchange (send the
input gradient, receive the next output gradient), and every other exchange that carries
both flows is split into its activation part followed by its gradient part. The executor
then posts an exchange without waiting and waits only before the next compute step of the
same flow, so the activation exchange travels during the backward and the gradient
exchange during the next forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple, Union


@dataclass(frozen=True)
class Step:
    """Compute: ``kind`` 'F' (forward) or 'B' (backward) of ``microbatch`` on ``chunk``."""

    kind: str
    microbatch: int
    chunk: int


@dataclass(frozen=True)
class Exchange:
    """One batched p2p exchange.

    send_next: (microbatch, chunk) of a forward whose output goes to the next stage.
    send_prev: (microbatch, chunk) of a backward whose input gradient goes to the previous stage.
    recv_prev: chunk whose input queue gets an activation from the previous stage.
    recv_next: chunk whose gradient queue gets an output gradient from the next stage.
    """

    send_next: Optional[Tuple[int, int]] = None
    send_prev: Optional[Tuple[int, int]] = None
    recv_prev: Optional[int] = None
    recv_next: Optional[int] = None

    def empty(self) -> bool:
        return self.send_next is None and self.send_prev is None and self.recv_prev is None and self.recv_next is None

    @property
    def activation_flow(self) -> bool:
        """Whether it sends an activation to the next stage or receives one from the previous."""
        return self.send_next is not None or self.recv_prev is not None

    @property
    def gradient_flow(self) -> bool:
        """Whether it sends a gradient to the previous stage or receives one from the next."""
        return self.send_prev is not None or self.recv_next is not None

    def split_by_flow(self) -> List["Exchange"]:
        """[activation part, gradient part], the empty ones left out."""
        parts = [Exchange(send_next=self.send_next, recv_prev=self.recv_prev),
                 Exchange(send_prev=self.send_prev, recv_next=self.recv_next)]
        return [part for part in parts if not part.empty()]


Action = Union[Step, Exchange]


def check_microbatch_group(pp: int, num_microbatches: int, group_size: int) -> None:
    """Megatron's constraints on the interleaved schedule's micro-batch group size."""
    if not pp <= group_size <= num_microbatches:
        raise ValueError(
            f"--microbatch-group-size-per-virtual-pipeline-stage {group_size}: the interleaved schedule "
            f"needs PP ({pp}) <= group size <= number of micro-batches ({num_microbatches}); change the "
            "group size, or the global batch size so that there are enough micro-batches"
        )
    remainder = num_microbatches % group_size
    if 0 < remainder < pp:
        raise ValueError(
            f"--microbatch-group-size-per-virtual-pipeline-stage {group_size}: the {num_microbatches} "
            f"micro-batches leave a last group of {remainder}, fewer than PP ({pp}), which creates "
            "dependency bubbles; use a number of micro-batches divisible by the group size, or a last "
            "group of at least PP"
        )


def microbatch_chunk_order(num_microbatches: int, vpp: int, group_size: int) -> List[Tuple[int, int]]:
    """Forward order of (microbatch, chunk) for the interleaved schedule (same on every rank)."""
    order = []
    for start in range(0, num_microbatches, group_size):
        end = num_microbatches if start + group_size >= num_microbatches else start + group_size
        order.extend((mb, chunk) for chunk in range(vpp) for mb in range(start, end))
    return order


def num_warmup_microbatches(pp: int, rank: int, num_microbatches: int, vpp: Optional[int] = None,
                            group_size: Optional[int] = None) -> int:
    """Forward passes stage ``rank`` runs before its first backward (counting chunk passes)."""
    if not vpp or vpp == 1:
        return min(pp - rank - 1, num_microbatches)
    group_size = pp if group_size is None else group_size
    return min((pp - rank - 1) * 2 + (vpp - 1) * group_size, num_microbatches * vpp)


def _plan_1f1b(pp: int, rank: int, m: int, forward_only: bool) -> List[Action]:
    first, last = rank == 0, rank == pp - 1
    warmup = m if forward_only else num_warmup_microbatches(pp, rank, m)
    remaining = m - warmup
    recv_prev = None if first else 0
    recv_next = None if last else 0

    def fwd_out(mb):
        return None if last else (mb, 0)

    def bwd_out(mb):
        return None if first else (mb, 0)

    plan: List[Action] = []
    for mb in range(warmup):
        plan += [Exchange(recv_prev=recv_prev), Step("F", mb, 0), Exchange(send_next=fwd_out(mb))]
    if remaining:
        plan.append(Exchange(recv_prev=recv_prev))
    for i in range(remaining):
        mb_f, final = warmup + i, i == remaining - 1
        plan += [Step("F", mb_f, 0), Exchange(send_next=fwd_out(mb_f), recv_next=recv_next), Step("B", i, 0)]
        plan.append(Exchange(send_prev=bwd_out(i), recv_prev=None if final else recv_prev))
    if not forward_only:
        for mb in range(remaining, m):
            plan += [Exchange(recv_next=recv_next), Step("B", mb, 0), Exchange(send_prev=bwd_out(mb))]
    return plan


class _Interleaved:
    """Index arithmetic of the interleaved schedule for one rank (k = virtual micro-batch)."""

    def __init__(self, pp: int, rank: int, m: int, vpp: int, group_size: int):
        self.pp, self.rank, self.vpp = pp, rank, vpp
        self.order = microbatch_chunk_order(m, vpp, group_size)
        self.total = len(self.order)
        self.first, self.last = rank == 0, rank == pp - 1

    def chunk(self, k: int, forward: bool) -> int:
        chunk = self.order[k % self.total][1]
        return chunk if forward else self.vpp - 1 - chunk

    def microbatch(self, k: int) -> int:
        return self.order[k][0]

    def forward_output(self, k: int) -> Optional[Tuple[int, int]]:
        chunk = self.chunk(k, True)
        return None if self.last and chunk == self.vpp - 1 else (self.microbatch(k), chunk)

    def backward_output(self, k: int) -> Optional[Tuple[int, int]]:
        chunk = self.chunk(k, False)
        return None if self.first and chunk == 0 else (self.microbatch(k), chunk)

    def incoming(self, k: int, forward: bool) -> Optional[int]:
        """After virtual micro-batch ``k``: the chunk whose queue the next message from the
        upstream neighbour feeds, or None when that neighbour sends nothing now.

        The stage that leads a direction (first rank forward, last rank backward) runs
        PP - 1 virtual micro-batches ahead of the stage that wraps around to it."""
        leading = self.first if forward else self.last
        if not leading:
            return self.chunk(k + 1, forward)
        if k < self.pp - 1:
            return None
        upstream_chunk = self.chunk(k - (self.pp - 1), forward)
        if upstream_chunk == (self.vpp - 1 if forward else 0):
            return None
        return upstream_chunk + (1 if forward else -1)


def _plan_interleaved(pp: int, rank: int, m: int, vpp: int, group_size: int, forward_only: bool,
                      overlap_p2p: bool = False) -> List[Action]:
    t = _Interleaved(pp, rank, m, vpp, group_size)
    total = t.total
    warmup = total if forward_only else num_warmup_microbatches(pp, rank, m, vpp, group_size)
    all_warmup = warmup == total
    remaining = total - warmup
    plan: List[Action] = [Exchange(recv_prev=None if t.first else 0)]
    for k in range(warmup):
        plan.append(Step("F", t.microbatch(k), t.chunk(k, True)))
        recv_prev = None if k == total - 1 else t.incoming(k, True)
        recv_next = None
        if k == warmup - 1 and not forward_only and not all_warmup and not t.last:
            recv_next = vpp - 1
        plan.append(Exchange(send_next=t.forward_output(k), recv_prev=recv_prev, recv_next=recv_next))
    for k in range(remaining):
        fk = k + warmup
        recv_prev = None if k == remaining - 1 else t.incoming(fk, True)
        forward = Step("F", t.microbatch(fk), t.chunk(fk, True))
        backward = Step("B", t.microbatch(k), t.chunk(k, False))
        activations = Exchange(send_next=t.forward_output(fk), recv_prev=recv_prev)
        gradients = Exchange(send_prev=t.backward_output(k), recv_next=t.incoming(k, False))
        if overlap_p2p:  # the activations travel during the backward
            plan += [forward, activations, backward, gradients]
        else:
            plan += [forward, backward, Exchange(send_next=activations.send_next, send_prev=gradients.send_prev,
                                                 recv_prev=activations.recv_prev, recv_next=gradients.recv_next)]
    if forward_only:
        return plan
    if all_warmup:
        plan.append(Exchange(recv_next=None if t.last else vpp - 1))
    for k in range(remaining, total):
        plan.append(Step("B", t.microbatch(k), t.chunk(k, False)))
        recv_next = None if k == total - 1 else t.incoming(k, False)
        plan.append(Exchange(send_prev=t.backward_output(k), recv_next=recv_next))
    return plan


def pipeline_plan(pp: int, rank: int, num_microbatches: int, vpp: Optional[int] = None,
                  group_size: Optional[int] = None, forward_only: bool = False,
                  overlap_p2p: bool = False) -> List[Action]:
    """Steps and exchanges of stage ``rank``, in order (empty exchanges dropped).

    ``vpp`` None or 1: 1F1B; otherwise interleaved with groups of ``group_size``
    (default PP), which must satisfy ``check_microbatch_group``. ``overlap_p2p``: no
    exchange mixes activations and gradients (see the module docstring); interleaved only,
    as in Megatron.
    """
    if pp < 1 or not 0 <= rank < pp:
        raise ValueError(f"pipeline rank {rank} is outside a pipeline of {pp} stage(s)")
    if num_microbatches < 1:
        raise ValueError(f"the pipeline needs at least one micro-batch, got {num_microbatches}")
    if not vpp or vpp == 1:
        if overlap_p2p:
            raise ValueError("the 1F1B schedule does not overlap p2p communication (Megatron's rule): "
                             "use the interleaved schedule (--num-virtual-stages-per-pipeline-rank) or "
                             "--no-overlap-p2p-communication")
        plan = _plan_1f1b(pp, rank, num_microbatches, forward_only)
    else:
        group_size = pp if group_size is None else group_size
        check_microbatch_group(pp, num_microbatches, group_size)
        plan = _plan_interleaved(pp, rank, num_microbatches, vpp, group_size, forward_only, overlap_p2p)
        if overlap_p2p:
            plan = [part for a in plan for part in (a.split_by_flow() if isinstance(a, Exchange) else [a])]
    return [a for a in plan if not (isinstance(a, Exchange) and a.empty())]


def schedule_table(pp: int, rank: int, num_microbatches: int, vpp: Optional[int] = None,
                   group_size: Optional[int] = None, forward_only: bool = False,
                   overlap_p2p: bool = False) -> List[Tuple[str, int, int]]:
    """The compute order of stage ``rank``: ``[(kind 'F'|'B', microbatch, chunk), ...]``."""
    plan = pipeline_plan(pp, rank, num_microbatches, vpp, group_size, forward_only, overlap_p2p)
    return [(a.kind, a.microbatch, a.chunk) for a in plan if isinstance(a, Step)]
