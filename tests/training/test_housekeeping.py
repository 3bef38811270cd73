"""--manual-gc and --empty-unused-memory-level: collections and cache releases at fixed points,
and training unchanged by them."""

from __future__ import annotations

import argparse
import gc

import pytest
import torch

from megatron.training import housekeeping
from megatron.training.arguments import parse_and_validate
from tests.training.gpt_runs import grad_norms, losses, run_gpt


def _args(**values):
    base = dict(manual_gc=True, manual_gc_interval=3, manual_gc_eval=True, empty_unused_memory_level=0)
    base.update(values)
    return argparse.Namespace(**base)


def test_manual_gc_collects_at_the_interval_and_around_evaluation(monkeypatch):
    collected = []
    monkeypatch.setattr(housekeeping.gc, "collect", lambda *a: collected.append("collect"))
    was_enabled = gc.isenabled()
    gc.enable()
    try:
        manual = housekeeping.ManualGC(_args())
        manual.start()
        assert not gc.isenabled() and collected == ["collect"]
        for iteration in range(1, 8):
            manual.after_iteration(iteration)
        assert len(collected) == 1 + 2  # iterations 3 and 6
        manual.at_evaluation()
        assert len(collected) == 4
        housekeeping.ManualGC(_args(manual_gc_eval=False)).at_evaluation()
        assert len(collected) == 4
        manual.stop()
        assert gc.isenabled()
    finally:
        gc.enable() if was_enabled else gc.disable()


def test_without_manual_gc_nothing_changes(monkeypatch):
    collected = []
    monkeypatch.setattr(housekeeping.gc, "collect", lambda *a: collected.append("collect"))
    manual = housekeeping.ManualGC(_args(manual_gc=False))
    enabled = gc.isenabled()
    manual.start()
    manual.after_iteration(3)
    manual.at_evaluation()
    manual.stop()
    assert collected == [] and gc.isenabled() == enabled


@pytest.mark.parametrize("level, released", [(0, []), (1, [1]), (2, [1, 2])])
def test_empty_unused_memory_levels(monkeypatch, level, released):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for point in (1, 2):
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda point=point: calls.append(point))
        housekeeping.empty_unused_memory(_args(empty_unused_memory_level=level), level=point)
    assert calls == released


def test_negative_manual_gc_interval_is_refused():
    base = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
            "--max-position-embeddings", "32", "--micro-batch-size", "1", "--train-iters", "1"]
    with pytest.raises(ValueError, match=r"^--manual-gc-interval -1: must be >= 0"):
        parse_and_validate(base + ["--manual-gc", "--manual-gc-interval", "-1"])


def test_training_with_manual_gc_and_cache_release_is_unchanged():
    """Collections and cache releases move no number: same losses and grad norms, with a
    periodic evaluation in between."""
    extra = ["--eval-interval", "2", "--eval-iters", "1"]
    plain = run_gpt(1, extra, iters=4)
    tidy = run_gpt(1, extra + ["--manual-gc", "--manual-gc-interval", "2", "--empty-unused-memory-level", "2"],
                   iters=4)
    assert losses(tidy) == losses(plain) and len(losses(plain)) >= 4
    assert grad_norms(tidy) == grad_norms(plain)
