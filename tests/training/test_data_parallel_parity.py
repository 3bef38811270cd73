"""Data parallelism end to end: the distributed optimizer and overlapped reductions give
the single-process losses and final parameters; a dropped gradient reduction does not.

Tolerances. fp32: the runs compute the same float32 math, but data parallelism sums the
micro-batch grads in another order and the distributed optimizer sums the grad norm per
shard; that moves the last bits (measured: 2e-7 relative on the loss, 2e-6 absolute on
the params after 10 Adam steps at lr 1e-3). The bounds, 2e-5 relative on the loss (as
in test_gpt_parity) and 2e-5 absolute on the params, sit 10x above that drift and 500x
below the effect of one dropped reduce-scatter (1e-2 on the loss, 9e-3 on the params).
bf16 (with --clip-grad 100, so the norm is computed and logged but never clips): bf16
grads summed in fp32 are exact and Adam is elementwise, so the final params must be
bit-identical; the logged loss is averaged over dp in fp32 (measured 2e-7 relative), so
it keeps the fp32 bound. (With clipping active, the per-shard norm's last-bit change of
the clip factor flips some bf16 params by an ulp and the runs drift apart by ~3e-5 on
the loss: that is covered in fp32 above and in tests/core/optimizer.)
"""

import pytest

from tests.training.gpt_runs import losses, run_gpt_with_params

FP32_LOSS_RTOL = 2e-5
FP32_PARAM_ATOL = 2e-5
BF16 = ["--bf16", "--clip-grad", "100"]
BUCKETS = ["--ddp-bucket-size", "20000"]  # the tiny GPT's 135k params in several buckets


def _drop_grad_reduce_scatter():
    """A planted bug: every bucket's reduce-scatter does nothing."""
    from megatron.core.distributed import param_and_grad_buffer

    param_and_grad_buffer.reduce_scatter_grad_bucket = lambda *args, **kwargs: None


@pytest.fixture(scope="module")
def fp32_reference():
    return run_gpt_with_params(1, [])


@pytest.fixture(scope="module")
def bf16_reference():
    return run_gpt_with_params(1, BF16)


def _losses_close(got, ref, rtol, n=10):
    assert len(got) == len(ref) == n, (got, ref)
    for i, (x, y) in enumerate(zip(got, ref)):
        assert abs(x - y) <= rtol * abs(y), f"iteration {i + 1}: {x} vs {y} (rtol {rtol})"


def _params_close(per_rank, ref, atol=0.0, rtol=0.0):
    for rank, params in enumerate(per_rank):
        assert params.keys() == ref.keys()
        for name, value in params.items():
            bound = atol + rtol * ref[name].abs()
            err = (value - ref[name]).abs()
            assert bool((err <= bound).all()), f"rank {rank} {name}: max error {err.max().item()}"


@pytest.mark.parametrize(
    "world, extra, optimizer",
    [
        (2, ["--use-distributed-optimizer"], "DistributedOptimizer"),
        (4, ["--use-distributed-optimizer"], "DistributedOptimizer"),
        (4, ["--overlap-grad-reduce"] + BUCKETS, "FP32Optimizer"),
        # Micro-batch 1: two micro-batches per rank, so the overlapped reduce-scatter also
        # runs after accumulation under no_sync.
        (4, ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
             "--micro-batch-size", "1"] + BUCKETS, "DistributedOptimizer"),
    ],
    ids=["dp2-distopt", "dp4-distopt", "dp4-overlap-grad-reduce", "dp4-distopt-overlap-param-gather"],
)
def test_fp32_matches_single_process(fp32_reference, world, extra, optimizer):
    log, params, optimizers = run_gpt_with_params(world, extra)
    assert optimizers == [optimizer] * world
    _losses_close(losses(log), losses(fp32_reference[0]), FP32_LOSS_RTOL)
    _params_close(params, fp32_reference[1][0], atol=FP32_PARAM_ATOL)


def test_bf16_distributed_optimizer_matches_single_process(bf16_reference):
    log, params, optimizers = run_gpt_with_params(2, BF16 + ["--use-distributed-optimizer"])
    assert optimizers == ["DistributedOptimizer"] * 2
    _losses_close(losses(log), losses(bf16_reference[0]), FP32_LOSS_RTOL)
    _params_close(params, bf16_reference[1][0], atol=0.0)


def test_dropped_reduce_scatter_fails_parity(fp32_reference):
    """The parity checks catch a real bug: grads that are never reduced over dp."""
    log, _, _ = run_gpt_with_params(2, ["--use-distributed-optimizer"], iters=3, patch=_drop_grad_reduce_scatter)
    got, ref = losses(log), losses(fp32_reference[0])[:3]
    assert len(got) == 3
    assert any(abs(x - y) > 10 * FP32_LOSS_RTOL * abs(y) for x, y in zip(got, ref)), (got, ref)
    with pytest.raises(AssertionError):
        _losses_close(got, ref, FP32_LOSS_RTOL, n=3)
