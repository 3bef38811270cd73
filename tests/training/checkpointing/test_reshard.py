"""Checkpoints reshard: a checkpoint saved under one parallel layout loads into another
with every model tensor and every optimizer state (fp32 main param, Adam's moments)
exactly as saved, and training goes on from it.

Each ring saves at layout A, loads into B (which trains one step and saves), loads that
into C (likewise), and C's checkpoint back into A. Every load is compared bitwise with the
state the previous run saved, in the layout-independent space of full tensors; every first
step after a load is compared with the uninterrupted run at A. Those losses agree only to
a tolerance: another layout sums the same numbers in another order (tensor-parallel
partial sums, data-parallel gradient all-reduce)."""

from __future__ import annotations

import math
from typing import Dict, List, Tuple

import pytest

from tests.training.checkpointing.ckpt_runs import CkptRun, assert_same_tensors, run_ckpt

SAVED_AT = 2
TP2 = ["--tensor-model-parallel-size", "2"]
PP2 = ["--pipeline-model-parallel-size", "2"]
DIST_OPT = ["--use-distributed-optimizer"]

# name: (flags common to the ring, [(world size, layout flags)] for A, B, C; loss tolerance)
RINGS = {
    # TP 1 -> 2, then TP 2 / PP 1 -> TP 1 / PP 2, then PP 2 -> 1.
    "tp_pp_fp32": ([], [(1, []), (2, TP2), (2, PP2)], 1e-6),
    # DP 1 -> 2 with the distributed optimizer on, then DP 2 -> 1 with it off and
    # TP 1 -> 2 on a gated MLP (fc1 is a stride-2 tensor-parallel param) with grouped
    # query attention, then TP 2 -> 1. bf16 rounds each layout's partial sums differently.
    "dp_distopt_swiglu_gqa_bf16": (["--bf16", "--swiglu", "--group-query-attention", "--num-query-groups", "2"],
                                   [(1, []), (2, DIST_OPT), (2, TP2)], 1e-4),
    # MoE: EP 1 -> 2 (each rank holds half the experts under their global numbers), then
    # EP 2 -> DP 2 with the distributed optimizer (every rank all experts), then back to 1.
    "moe_ep_distopt_fp32": (["--num-experts", "4", "--moe-router-topk", "2"],
                            [(1, []), (2, ["--expert-model-parallel-size", "2"]), (2, DIST_OPT)], 1e-5),
}

Ring = Tuple[List[CkptRun], float]


def _run_ring(name: str, tmp_path_factory) -> Ring:
    common, layouts, tolerance = RINGS[name]
    (world_a, flags_a), others = layouts[0], layouts[1:]
    roots = [str(tmp_path_factory.mktemp(f"{name}_{i}")) for i in range(len(layouts))]
    total = SAVED_AT + len(layouts)
    runs = [run_ckpt(world_a, common + flags_a + ["--save", roots[0], "--save-interval", str(SAVED_AT)], total,
                     snapshots=(SAVED_AT,))]
    loaded_at = SAVED_AT
    for i, (world, flags) in enumerate(others, start=1):
        # Every run keeps --train-iters (the checkpoint's scheduler is checked against it)
        # and stops after one step with --exit-interval, saving on the way out.
        runs.append(run_ckpt(world, common + flags + ["--load", roots[i - 1], "--ckpt-step", str(loaded_at),
                                                      "--save", roots[i], "--save-interval", "1000",
                                                      "--exit-interval", str(loaded_at + 1)],
                             total, snapshots=("load", loaded_at + 1)))
        loaded_at += 1
    runs.append(run_ckpt(world_a, common + flags_a + ["--load", roots[-1], "--ckpt-step", str(loaded_at)],
                         total, snapshots=("load",)))
    return runs, tolerance


@pytest.fixture(scope="module")
def rings(tmp_path_factory):
    cache: Dict[str, Ring] = {}

    def get(name: str) -> Ring:
        if name not in cache:
            cache[name] = _run_ring(name, tmp_path_factory)
        return cache[name]

    return get


@pytest.mark.parametrize("name", sorted(RINGS))
def test_every_load_restores_the_saved_state_exactly(rings, name):
    runs, _ = rings(name)
    saved_at = SAVED_AT
    for saver, loader in zip(runs, runs[1:]):
        saved, loaded = saver.snapshots[saved_at], loader.snapshots["load"]
        assert_same_tensors(saved, loaded, prefix="optimizer.state.exp_avg.")
        assert_same_tensors(saved, loaded, prefix="optimizer.state.exp_avg_sq.")
        if "bf16" in name:
            assert_same_tensors(saved, loaded, prefix="optimizer.state.fp32_param.")
        assert_same_tensors(saved, loaded)
        saved_at += 1


@pytest.mark.parametrize("name", sorted(RINGS))
def test_training_continues_after_each_load(rings, name):
    runs, tolerance = rings(name)
    uninterrupted = runs[0].loss_floats()
    for i, run in enumerate(runs[1:]):
        iteration = SAVED_AT + 1 + i
        losses = run.loss_floats()
        assert list(losses) == [iteration], run.log[-2000:]
        assert math.isfinite(losses[iteration])
        relative = abs(losses[iteration] / uninterrupted[iteration] - 1)
        assert relative <= tolerance, f"run {i + 1} of the ring, iteration {iteration}: relative difference {relative:.2e}"


def test_padded_vocabulary_loads_the_common_rows(tmp_path):
    """Vocabulary 600 pads to 640 at TP 1 and to 768 at TP 2 (a multiple of 128 x TP):
    the embedding and its optimizer state load where the two overlap."""
    vocab = ["--vocab-size", "600", "--make-vocab-size-divisible-by", "128", "--lr-warmup-iters", "0"]
    root = str(tmp_path)
    saved = run_ckpt(1, vocab + ["--save", root, "--save-interval", "1"], 1, snapshots=(1,))
    loaded = run_ckpt(2, vocab + TP2 + ["--load", root], 1, snapshots=("load",))
    key = "embedding.word_embeddings.weight"
    assert saved.snapshots[1][key].shape[0] == 640 and loaded.snapshots["load"][key].shape[0] == 768
    assert_same_tensors(saved.snapshots[1], loaded.snapshots["load"])
