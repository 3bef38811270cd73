"""--num-distributed-optimizer-instances: DP x CP ranks cut into N instances, the optimizer
state sharded inside each, grads reduce-scattered inside the instance and then all-reduced
across instances. Training must be the one-process training, on every rank.

What is compared: the logged losses and grad norms with the single-process run and with
one instance, and the final params of every rank, which must be bit-identical across ranks
(every instance steps the same grads) and equal the single-process params. Tolerances are
test_data_parallel_parity's (2e-5 relative on the loss, 2e-5 absolute on the params: the
reductions add the same float32 numbers in another order); the grad norm is logged with
three decimals, so counting it once per instance (x sqrt(2)) shows at once. Dropping the
all-reduce across instances moves the loss by ~1e-2 and makes the instances' params
differ, which ``test_skipped_all_reduce_across_instances_fails`` proves the checks catch.
"""

import re

import pytest
import torch

from megatron.training.arguments import parse_and_validate
from tests.training.gpt_runs import grad_norms, losses, run_gpt_with_params

LOSS_RTOL = 2e-5
PARAM_ATOL = 2e-5
DISTOPT = ["--use-distributed-optimizer"]
TWO_INSTANCES = DISTOPT + ["--num-distributed-optimizer-instances", "2"]
TP2 = ["--tensor-model-parallel-size", "2"]
# Micro-batch 1 (two micro-batches per rank) and several buckets: the overlapped, chained
# reduce-scatter + all-reduce runs from the backward hooks, after accumulation under no_sync.
OVERLAP = ["--overlap-grad-reduce", "--overlap-param-gather", "--micro-batch-size", "1",
           "--ddp-bucket-size", "20000"]
MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--disable-bias-linear", "--swiglu"]
EP2 = ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall"]
MOE_ITERS = 3


def _skip_all_reduce_across_instances():
    """A planted bug: the shards' grads are never all-reduced across instances."""
    from megatron.core.distributed import data_parallel_collectives

    data_parallel_collectives.all_reduce_shard_across_instances = lambda *args, **kwargs: None


@pytest.fixture(scope="module")
def reference():
    return run_gpt_with_params(1, [])


def _losses_close(got, ref, n=10):
    assert len(got) == len(ref) == n, (got, ref)
    for i, (x, y) in enumerate(zip(got, ref)):
        assert abs(x - y) <= LOSS_RTOL * abs(y), f"iteration {i + 1}: {x} vs {y} (rtol {LOSS_RTOL})"


def _params_close(per_rank, ref):
    for rank, params in enumerate(per_rank):
        assert params.keys() == ref.keys()
        for name, value in params.items():
            err = (value - ref[name]).abs().max().item()
            assert err <= PARAM_ATOL, f"rank {rank} {name}: max error {err}"


def _replicas_identical(per_rank, replicas):
    """Ranks in ``replicas`` (lists of ranks holding the same params) agree bit for bit."""
    for ranks in replicas:
        first = per_rank[ranks[0]]
        for rank in ranks[1:]:
            for name, value in per_rank[rank].items():
                assert torch.equal(value, first[name]), f"ranks {ranks[0]} and {rank} differ in {name}"


def _matches(run, ref_run, n=10):
    log, params, optimizers = run
    assert set(optimizers) == {"DistributedOptimizer"}
    _losses_close(losses(log), losses(ref_run[0]), n)
    assert grad_norms(log) == pytest.approx(grad_norms(ref_run[0]), rel=1e-4)
    return params


@pytest.mark.parametrize("extra", [[], OVERLAP], ids=["sync", "overlap"])
def test_dp4_two_instances_matches_one_process_and_one_instance(reference, extra):
    two = run_gpt_with_params(4, TWO_INSTANCES + extra)
    params = _matches(two, reference)
    _replicas_identical(params, [[0, 1, 2, 3]])
    _params_close(params, reference[1][0])
    if not extra:  # one instance reduces the same grads in one collective
        one_instance = run_gpt_with_params(4, DISTOPT)
        _matches(two, one_instance)
        _params_close(params, one_instance[1][0])


def test_tp2_dp2_two_instances_matches_one_instance_and_one_process(reference):
    """Instances of one rank each: the shard is the whole bucket, all-reduced across the two."""
    two = run_gpt_with_params(4, TP2 + TWO_INSTANCES)
    _matches(two, reference)
    one_instance = run_gpt_with_params(4, TP2 + DISTOPT)
    params = _matches(two, one_instance)
    # ranks 0, 2 hold tensor-parallel rank 0's pieces; 1, 3 rank 1's
    _replicas_identical(params, [[0, 2], [1, 3]])
    for rank in range(4):
        _params_close([params[rank]], one_instance[1][rank])


def test_moe_expert_params_shard_inside_instances():
    """EP 2 on 4 ranks: dense params shard over 2 ranks per instance, expert params over 1,
    both all-reduced across the 2 instances."""
    ref = run_gpt_with_params(1, MOE, iters=MOE_ITERS)
    two = run_gpt_with_params(4, MOE + EP2 + TWO_INSTANCES, iters=MOE_ITERS)
    params = _matches(two, ref, n=MOE_ITERS)
    _replicas_identical(params, [[0, 2], [1, 3]])  # ranks 0, 2 hold experts 0-1; 1, 3 experts 2-3
    for rank, mine in enumerate(params):
        # local expert i of expert-parallel rank r is expert 2 * r + i of the one process
        ep_rank = rank % 2
        as_global = {re.sub(r"local_experts\.(\d+)", lambda m: f"local_experts.{2 * ep_rank + int(m[1])}", k): v
                     for k, v in mine.items()}
        assert any("local_experts.3" in k for k in as_global) == (ep_rank == 1)
        _params_close([as_global], {k: v for k, v in ref[1][0].items() if k in as_global})


def test_skipped_all_reduce_across_instances_fails(reference):
    """The checks above catch a real bug: shards reduced inside the instance only."""
    log, params, _ = run_gpt_with_params(4, TWO_INSTANCES, iters=3, patch=_skip_all_reduce_across_instances)
    got, ref = losses(log), losses(reference[0])[:3]
    assert len(got) == 3
    assert any(abs(x - y) > 10 * LOSS_RTOL * abs(y) for x, y in zip(got, ref)), (got, ref)
    with pytest.raises(AssertionError):
        _losses_close(got, ref, n=3)
    # Each instance stepped its own half of the batch: ranks 0-1 and 2-3 now differ.
    _replicas_identical(params, [[0, 1], [2, 3]])
    with pytest.raises(AssertionError):
        _replicas_identical(params, [[0, 2]])


TINY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--max-position-embeddings", "32", "--micro-batch-size", "1", "--train-iters", "1", "--lr", "1e-3"]


@pytest.mark.parametrize(
    "world, extra, message",
    [
        (4, ["--num-distributed-optimizer-instances", "2"], "need --use-distributed-optimizer"),
        (6, DISTOPT + ["--num-distributed-optimizer-instances", "4"], "data x context parallel size 6"),
        (4, TWO_INSTANCES + ["--tensor-model-parallel-size", "4"], "data x context parallel size 1"),
        (4, TWO_INSTANCES + ["--num-experts", "4", "--expert-model-parallel-size", "4"],
         "expert data-parallel size 1"),
        (4, DISTOPT + ["--num-distributed-optimizer-instances", "0"], "must be a positive integer"),
    ],
    ids=["without-distopt", "dp-not-divisible", "tp4-leaves-dp1", "expert-dp-not-divisible", "zero"],
)
def test_flag_validation_names_the_flag_and_the_fix(world, extra, message):
    with pytest.raises(ValueError, match="--num-distributed-optimizer-instances") as error:
        parse_and_validate(TINY + extra, world_size=world)
    assert message in str(error.value)
    assert "Fix:" in str(error.value)


def test_two_instances_are_accepted():
    from megatron.training.startup_summary import describe_precision

    args = parse_and_validate(TINY + TWO_INSTANCES, world_size=4)
    assert args.num_distributed_optimizer_instances == 2
    assert "(distributed optimizer, 2 instances)" in describe_precision(args)
