"""A tiny GPT trains, and every parallel layout gives the single-process losses.

Tolerance: the runs compute the same float32 math, but tensor parallelism splits the
matmuls and all-reduces partial sums, and data parallelism averages gradients across
ranks, so sums are added in another order. That changes the last bits (~1e-7 relative)
and Adam carries the difference forward over 10 steps; 2e-5 relative on the loss is
well above that drift and far below a real error (a row-parallel layer that skips its
all-reduce moves the loss by ~1e-3 relative at the first step; see
test_broken_layer_fails_parity).
"""

import pytest

from tests.training.gpt_runs import grad_norms, losses, run_gpt

RTOL = 2e-5


@pytest.fixture(scope="module")
def reference_log():
    return run_gpt(1, [])


def _close(a, b, rtol=RTOL):
    assert len(a) == len(b) == 10, (a, b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert abs(x - y) <= rtol * abs(y), f"iteration {i + 1}: {x} vs {y} (rtol {rtol})"


def test_single_process_loss_falls(reference_log):
    ref = losses(reference_log)
    assert len(ref) == 10
    assert ref[-1] < ref[0] - 0.05, ref
    assert "iteration       10/      10 |" in reference_log
    assert "consumed samples:           80 |" in reference_log


@pytest.mark.parametrize(
    "world, extra",
    [
        (2, ["--tensor-model-parallel-size", "2"]),
        (2, []),  # data parallel 2
        (4, ["--tensor-model-parallel-size", "2"]),  # TP2 x DP2
        (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
        (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--tp-comm-overlap"]),
        (1, ["--recompute-activations"]),
        (1, ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "1"]),
        (2, ["--tensor-model-parallel-size", "2", "--recompute-granularity", "full", "--recompute-method",
             "uniform", "--recompute-num-layers", "1", "--distribute-saved-activations"]),
    ],
    ids=["tp2", "dp2", "tp2xdp2", "tp2-sp", "tp2-sp-comm-overlap", "selective-recompute", "full-block-recompute",
         "tp2-full-uniform-recompute-distributed"],
)
def test_parallel_layout_matches_single_process(reference_log, world, extra):
    log = run_gpt(world, extra)
    _close(losses(log), losses(reference_log))
    _close(grad_norms(log), grad_norms(reference_log), rtol=1e-4)


def test_gradient_accumulation_equals_bigger_micro_batch():
    """4 micro-batches of 2 samples give the same steps as 1 micro-batch of 8."""
    small = losses(run_gpt(1, [], iters=5))
    big = losses(run_gpt(1, ["--micro-batch-size", "8"], iters=5))
    assert len(small) == len(big) == 5
    for x, y in zip(small, big):
        assert abs(x - y) <= RTOL * abs(y), (small, big)


def test_broken_layer_fails_parity(reference_log):
    """The parity check catches a real bug: a row-parallel layer that skips its all-reduce."""
    log = run_gpt(2, ["--tensor-model-parallel-size", "2"], iters=3, setup="broken_row_parallel")
    got, ref = losses(log), losses(reference_log)[:3]
    assert len(got) == 3
    assert any(abs(x - y) > 10 * RTOL * abs(y) for x, y in zip(got, ref)), (got, ref)
