"""Which layers each pipeline rank and virtual chunk builds."""

import pytest

from megatron.core.pipeline_parallel.layer_split import stage_layers, virtual_stage_layer_counts


def _layers(num_layers, pp, vpp=None, **kw):
    """{(rank, chunk): [global 1-based layer numbers]}."""
    out = {}
    for rank in range(pp):
        for chunk in range(vpp or 1):
            n, offset = stage_layers(num_layers, pp, rank, chunk if vpp else None, vpp, **kw)
            out[(rank, chunk)] = list(range(offset + 1, offset + n + 1))
    return out


def test_even_split():
    assert _layers(8, 4) == {(0, 0): [1, 2], (1, 0): [3, 4], (2, 0): [5, 6], (3, 0): [7, 8]}


def test_virtual_chunks_follow_megatron_order():
    # Virtual stage c * PP + r: rank 0 holds layers 1-2 and 5-6, rank 1 holds 3-4 and 7-8.
    assert _layers(8, 2, 2) == {(0, 0): [1, 2], (0, 1): [5, 6], (1, 0): [3, 4], (1, 1): [7, 8]}
    assert _layers(8, 2, 4) == {(0, 0): [1], (0, 1): [3], (0, 2): [5], (0, 3): [7],
                                (1, 0): [2], (1, 1): [4], (1, 2): [6], (1, 3): [8]}


def test_uneven_first_and_last():
    assert _layers(4, 2, first=3) == {(0, 0): [1, 2, 3], (1, 0): [4]}
    assert _layers(10, 4, first=1, last=3) == {(0, 0): [1], (1, 0): [2, 3, 4], (2, 0): [5, 6, 7], (3, 0): [8, 9, 10]}
    assert _layers(6, 3, last=2) == {(0, 0): [1, 2], (1, 0): [3, 4], (2, 0): [5, 6]}


def test_uneven_with_virtual_chunks():
    # First rank 2 layers (1 per chunk), last rank 4 (2 per chunk), middle 12 / 2 ranks / 2 chunks.
    got = _layers(18, 4, 2, first=2, last=4)
    assert [len(got[(r, c)]) for c in range(2) for r in range(4)] == [1, 3, 3, 2, 1, 3, 3, 2]
    assert got[(0, 1)] == [10] and got[(3, 1)] == [17, 18]


def test_account_for_embedding_and_loss():
    # 6 layers + embedding + loss = 8 slots over 4 stages: the ends build one layer fewer.
    assert _layers(6, 4, account_for_embedding=True, account_for_loss=True) == {
        (0, 0): [1], (1, 0): [2, 3], (2, 0): [4, 5], (3, 0): [6]}


@pytest.mark.parametrize("num_layers, pp, vpp, first, last", [
    (8, 2, None, None, None), (12, 3, 2, None, None), (18, 4, 2, 2, 4), (5, 2, None, 3, None), (12, 4, 3, 3, 3),
])
def test_every_layer_exactly_once_in_order(num_layers, pp, vpp, first, last):
    counts = virtual_stage_layer_counts(num_layers, pp, vpp, first, last)
    assert sum(counts) == num_layers
    got = _layers(num_layers, pp, vpp, first=first, last=last)
    by_virtual_stage = [got[(v % pp, v // pp)] for v in range(pp * (vpp or 1))]
    assert [layer for stage in by_virtual_stage for layer in stage] == list(range(1, num_layers + 1))


@pytest.mark.parametrize("args, flag", [
    ((6, 4), "--num-layers"),
    ((8, 3, None, 3, None), "--decoder-first-pipeline-num-layers"),
    ((8, 2, 2, 3, None), "virtual stages"),
    ((8, 1, None, 3, None), "--pipeline-model-parallel-size"),
])
def test_bad_splits_raise(args, flag):
    with pytest.raises(ValueError, match=flag):
        virtual_stage_layer_counts(*args)
