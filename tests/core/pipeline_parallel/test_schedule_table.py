"""The pure schedule table: orders, warmup sizes, constraints, and a whole-pipeline simulation."""

import pytest

from megatron.core.pipeline_parallel.schedule_table import (
    Exchange,
    Step,
    check_microbatch_group,
    microbatch_chunk_order,
    num_warmup_microbatches,
    pipeline_plan,
    schedule_table,
)
from tests.core.pipeline_parallel.pipeline_sim import PlanError, simulate


def test_1f1b_hand_written_pp2_m3():
    # rank 0: one warmup forward; rank 1 (last): none.
    assert schedule_table(2, 0, 3) == [("F", 0, 0), ("F", 1, 0), ("B", 0, 0), ("F", 2, 0), ("B", 1, 0), ("B", 2, 0)]
    assert schedule_table(2, 1, 3) == [("F", 0, 0), ("B", 0, 0), ("F", 1, 0), ("B", 1, 0), ("F", 2, 0), ("B", 2, 0)]


def test_interleaved_hand_written_pp2_vpp2_m4():
    """Megatron's table for PP=2, VPP=2, M=4 (G defaults to PP=2): forwards run micro-batches
    0,1 on chunk 0, then 0,1 on chunk 1, then 2,3 likewise; backwards reverse the chunks.
    Warmup: rank 0 (2-0-1)*2 + (2-1)*2 = 4, rank 1 2."""
    assert microbatch_chunk_order(4, 2, 2) == [(0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (3, 0), (2, 1), (3, 1)]
    rank0 = [
        ("F", 0, 0), ("F", 1, 0), ("F", 0, 1), ("F", 1, 1),
        ("F", 2, 0), ("B", 0, 1), ("F", 3, 0), ("B", 1, 1), ("F", 2, 1), ("B", 0, 0), ("F", 3, 1), ("B", 1, 0),
        ("B", 2, 1), ("B", 3, 1), ("B", 2, 0), ("B", 3, 0),
    ]
    rank1 = [
        ("F", 0, 0), ("F", 1, 0),
        ("F", 0, 1), ("B", 0, 1), ("F", 1, 1), ("B", 1, 1), ("F", 2, 0), ("B", 0, 0), ("F", 3, 0), ("B", 1, 0),
        ("F", 2, 1), ("B", 2, 1), ("F", 3, 1), ("B", 3, 1),
        ("B", 2, 0), ("B", 3, 0),
    ]
    assert schedule_table(2, 0, 4, vpp=2) == rank0
    assert schedule_table(2, 1, 4, vpp=2) == rank1


def test_group_order_with_uneven_last_group():
    # M=5, G=3: the last group holds micro-batches 3 and 4.
    assert microbatch_chunk_order(5, 2, 3) == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1),
                                                (3, 0), (4, 0), (3, 1), (4, 1)]


@pytest.mark.parametrize("pp, m", [(4, 8), (4, 2), (3, 5), (1, 3)])
def test_1f1b_warmup_and_counts(pp, m):
    for rank in range(pp):
        table = schedule_table(pp, rank, m)
        warmup = num_warmup_microbatches(pp, rank, m)
        assert warmup == min(pp - rank - 1, m)
        assert [k for k, _, _ in table[:warmup]] == ["F"] * warmup
        assert warmup == m or table[warmup][0] == "F"
        assert sorted(table) == sorted([("F", i, 0) for i in range(m)] + [("B", i, 0) for i in range(m)])


@pytest.mark.parametrize("pp, m, vpp, g", [(2, 4, 2, 2), (4, 8, 2, 4), (2, 6, 3, 3), (3, 7, 2, 4), (4, 4, 4, 4)])
def test_interleaved_warmup_order_and_counts(pp, m, vpp, g):
    for rank in range(pp):
        table = schedule_table(pp, rank, m, vpp, g)
        warmup = num_warmup_microbatches(pp, rank, m, vpp, g)
        assert warmup == min((pp - rank - 1) * 2 + (vpp - 1) * g, m * vpp)
        assert all(k == "F" for k, _, _ in table[:warmup]) and (warmup == m * vpp or table[warmup][0] == "F")
        expected = {(k, i, c) for k in "FB" for i in range(m) for c in range(vpp)}
        assert len(table) == len(expected) and set(table) == expected
        position = {step: i for i, step in enumerate(table)}
        for i in range(m):
            for c in range(vpp):
                assert position[("F", i, c)] < position[("B", i, c)]
                if c:
                    # A rank's later chunk runs forward after its earlier one, backward before it.
                    assert position[("F", i, c - 1)] < position[("F", i, c)]
                    assert position[("B", i, c)] < position[("B", i, c - 1)]


def test_forward_only_has_no_backward():
    for vpp in (None, 2):
        table = schedule_table(2, 0, 4, vpp, forward_only=True)
        assert [k for k, _, _ in table] == ["F"] * (4 * (vpp or 1))


@pytest.mark.parametrize("pp, m, g, ok", [(2, 4, 2, True), (2, 4, 1, False), (2, 4, 5, False), (4, 10, 4, False),
                                          (4, 12, 4, True), (2, 5, 3, True), (4, 9, 5, True)])
def test_microbatch_group_constraints(pp, m, g, ok):
    if ok:
        check_microbatch_group(pp, m, g)
        pipeline_plan(pp, 0, m, 2, g)
    else:
        with pytest.raises(ValueError, match="microbatch-group-size-per-virtual-pipeline-stage"):
            pipeline_plan(pp, 0, m, 2, g)


def _layouts():
    for pp in (1, 2, 3, 4):
        for m in (1, 2, 3, 5, 8):
            yield pp, m, None, None
        for vpp in (2, 3):
            for m in (pp, 2 * pp, 2 * pp + 1, 7):
                for g in range(pp, m + 1):
                    if not 0 < m % g < pp:
                        yield pp, m, vpp, g


@pytest.mark.parametrize("overlap_p2p", [False, True], ids=["batched", "overlap-p2p"])
@pytest.mark.parametrize("forward_only", [False, True])
def test_all_ranks_together_never_deadlock_and_route_every_message(forward_only, overlap_p2p):
    """Every plan of every rank, run against each other with rendezvous p2p: no deadlock,
    each activation/gradient reaches the right chunk and micro-batch, nothing is lost.
    With p2p overlap (interleaved layouts only) the same holds for the split exchanges."""
    count = 0
    for pp, m, vpp, g in _layouts():
        if overlap_p2p and vpp is None:
            continue
        executed = simulate(pp, m, vpp, g, forward_only, overlap_p2p=overlap_p2p)
        for rank in range(pp):
            assert executed[rank] == schedule_table(pp, rank, m, vpp, g, forward_only)
        count += 1
    assert count > 40


def test_overlap_p2p_keeps_flows_apart_and_sends_activations_before_the_backward():
    """With p2p overlap no exchange carries both activations and gradients; the compute
    order is unchanged; and in the steady state each forward's output leaves (and the next
    input is requested) before the backward that follows it, so that transfer runs during
    the backward."""
    for pp, m, vpp, g in [layout for layout in _layouts() if layout[2] is not None]:
        for rank in range(pp):
            plan = pipeline_plan(pp, rank, m, vpp, g, overlap_p2p=True)
            batched = pipeline_plan(pp, rank, m, vpp, g)
            exchanges = [a for a in plan if isinstance(a, Exchange)]
            assert not any(a.activation_flow and a.gradient_flow for a in exchanges), (pp, m, vpp, g, rank)
            assert [a for a in plan if isinstance(a, Step)] == [a for a in batched if isinstance(a, Step)]
            steady = num_warmup_microbatches(pp, rank, m, vpp, g) < m * vpp
            between = _exchanges_between_forward_and_backward(plan)
            if steady and pp > 1:
                assert between and all(a.activation_flow for a in between), (pp, m, vpp, g, rank)


def _exchanges_between_forward_and_backward(plan):
    """Exchanges that sit between a forward step and the backward step right after it."""
    found, previous_step, pending = [], None, []
    for action in plan:
        if isinstance(action, Exchange):
            pending.append(action)
            continue
        if previous_step is not None and previous_step.kind == "F" and action.kind == "B":
            found += pending
        previous_step, pending = action, []
    return found


def test_overlap_p2p_is_for_the_interleaved_schedule_only():
    with pytest.raises(ValueError, match="1F1B schedule does not overlap p2p"):
        pipeline_plan(2, 0, 4, overlap_p2p=True)


def test_simulation_catches_a_broken_plan():
    plans = [pipeline_plan(2, r, 4, 2, 2) for r in range(2)]
    dropped = [list(p) for p in plans]
    dropped[1].remove(Step("B", 1, 0))  # a micro-batch's backward skipped on one stage
    with pytest.raises(PlanError):
        simulate(2, 4, 2, 2, plans=dropped)
    # Posting by direction (previous-stage ops, then next-stage ops) instead of by flow:
    # with two stages "previous" and "next" are the same rank, which then posts the
    # gradient first while its peer expects the activation first.
    with pytest.raises(PlanError):
        simulate(2, 4, 2, 2, by_direction=True)
