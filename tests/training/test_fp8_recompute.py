"""FP8 `delayed` scaling with full activation recompute trains exactly as without recompute.

A tiny GPT (and a tiny MoE GPT with grouped experts) in the FP8 emulation, delayed scaling
with an amax history of 4, trains 4 iterations of 4 micro-batches each once plainly and
once with --recompute-granularity full: the recompute quantizes with the scales the first
forward used and leaves the scaling state alone (``fp8.recompute_replay``), so the losses,
the weights and every amax history and scale are equal bit for bit. On two pipeline stages
the 1F1B schedule runs later forwards before earlier backwards, so the states move on
between a micro-batch's forward and its recompute.
"""

import pytest

from tests.training.checkpointing.ckpt_runs import assert_same_tensors, run_ckpt

FP8 = ["--fp8-format", "hybrid", "--fp8-recipe", "delayed", "--fp8-emulation", "--fp8-amax-history-len", "4",
       "--fp8-amax-compute-algo", "max"]
RECOMPUTE = ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-grouped-gemm", "--moe-ffn-hidden-size", "32"]
ITERS = 4


@pytest.mark.parametrize("world, extra", [
    (1, []),
    (2, ["--pipeline-model-parallel-size", "2"]),
    (1, MOE),
], ids=["dense", "pp2-1f1b", "moe-grouped"])
def test_full_recompute_equals_no_recompute_bit_for_bit(world, extra):
    plain = run_ckpt(world, FP8 + extra, iters=ITERS, snapshots=(ITERS,))
    recomputed = run_ckpt(world, FP8 + extra + RECOMPUTE, iters=ITERS, snapshots=(ITERS,))
    assert len(plain.losses) == ITERS and recomputed.losses == plain.losses
    state = {k: v for k, v in plain.snapshots[ITERS].items() if not k.startswith("optimizer.")}
    assert any(k.endswith(".fp8.amax_history") for k in state)
    assert_same_tensors(state, {k: v for k, v in recomputed.snapshots[ITERS].items() if k in state})
