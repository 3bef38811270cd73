"""DDP on 2 ranks: averaged grads, accumulation under no_sync, fp32 main grads,
overlapped bucketed reduction, broadcast and NaN checks.

All checks run inside one 2-rank launch (spawning ranks is the slow part); each
returns (got, expected) pairs that the test compares. Grads are compared with
atol 1e-6: the reference sums the same fp32 values in another order.
"""


import pytest
import torch

from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.transformer.transformer_config import TransformerConfig
from tests.multirank import run_on_ranks

TCFG = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2)


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(dtype)
    return model


def _data(rank, micro):
    g = torch.Generator().manual_seed(100 + 10 * rank + micro)
    return torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)


def _loss(model, x, y):
    dtype = next(model.parameters()).dtype
    return ((model(x.to(dtype)).float() - y) ** 2).sum()


def _reference_grads(micro_batches, world_size, dtype=torch.float32):
    """Mean over ranks of the grads of one model on each rank's concatenated micro-batches."""
    total = None
    for r in range(world_size):
        model = _model(dtype=dtype)
        xs, ys = zip(*(_data(r, m) for m in range(micro_batches)))
        _loss(model, torch.cat(xs), torch.cat(ys)).backward()
        grads = [p.grad.float() for p in model.parameters()]
        total = grads if total is None else [a + b for a, b in zip(total, grads)]
    return [t / world_size for t in total]


def _train(ddp_config, micro_batches, rank, dtype=torch.float32, probe=None):
    model = _model(dtype=dtype)
    ddp = DistributedDataParallel(TCFG, ddp_config, model)
    ddp.zero_grad_buffer()
    for m in range(micro_batches):
        x, y = _data(rank, m)
        if m < micro_batches - 1:
            with ddp.no_sync():
                _loss(ddp, x, y).backward()
        else:
            _loss(ddp, x, y).backward()
        if probe is not None:
            probe(ddp, m)
    ddp.finish_grad_sync()
    return ddp, [p.main_grad.clone() for p in model.parameters()]


def _launched(ddp):
    return [b.grad_reduce_handle is not None for buf in ddp.buffers for b in buf.buckets]


def _bucket_collectives(rank, world_size, out):
    """Both paths of the bucket collectives (gloo's fallback and the single-tensor one
    used on NCCL, which this gloo build also has), sync and async, in place."""
    from megatron.core.distributed import data_parallel_collectives as collectives

    group = parallel_state.get_process_groups().dp_cp
    original = collectives.native_single_tensor_collectives
    try:
        for native in (False, True):
            collectives.native_single_tensor_collectives = lambda g, native=native: native
            for async_op in (False, True):
                grad = torch.arange(8.0) + 100 * rank
                shard = grad[rank * 4:(rank + 1) * 4]
                handle = collectives.reduce_scatter_grad_bucket(grad, shard, group, async_op=async_op)
                if async_op:
                    handle.wait()
                expected = sum(torch.arange(8.0) + 100 * r for r in range(world_size))
                out[f"reduce_scatter_{native}_{async_op}"] = ([shard], [expected[rank * 4:(rank + 1) * 4]])
                params = torch.zeros(8)
                params[rank * 4:(rank + 1) * 4] = rank + 1
                handle = collectives.all_gather_param_bucket(params, params[rank * 4:(rank + 1) * 4], group,
                                                             async_op=async_op)
                if async_op:
                    handle.wait()
                out[f"all_gather_{native}_{async_op}"] = ([params], [torch.tensor([1.0] * 4 + [2.0] * 4)])
    finally:
        collectives.native_single_tensor_collectives = original


COLLECTIVE_CHECKS = [f"{op}_{native}_{async_op}" for op in ("reduce_scatter", "all_gather")
                     for native in (False, True) for async_op in (False, True)]


def _checks(rank, world_size):
    parallel_state.initialize_model_parallel()
    out = {}
    _bucket_collectives(rank, world_size, out)
    ddp, grads = _train(DistributedDataParallelConfig(), 1, rank)
    out["average"] = (grads, _reference_grads(1, world_size))
    out["grad_is_freed"] = ([p.grad is None for p in ddp.module.parameters()], [True] * 4)
    _, grads = _train(DistributedDataParallelConfig(), 2, rank)
    out["accumulate"] = (grads, _reference_grads(2, world_size))

    launched = {}
    overlap = DistributedDataParallelConfig(overlap_grad_reduce=True, bucket_size=30)
    ddp, grads = _train(overlap, 2, rank, probe=lambda d, m: launched.setdefault(m, _launched(d)))
    out["overlap"] = (grads, _reference_grads(2, world_size))
    # Reverse order b2, W2, b0, W0 = 3, 24, 8, 48 elements; a bucket closes once it
    # holds >= 30 (Megatron's rule): [3+24+8] [48].
    out["buckets"] = (len(ddp.buffers[0].buckets), 2)
    out["no_launch_in_no_sync"] = (launched[0], [False] * 2)
    out["launch_in_last_backward"] = (launched[1], [True] * 2)

    ddp, grads = _train(DistributedDataParallelConfig(grad_reduce_in_fp32=True), 1, rank, dtype=torch.bfloat16)
    out["bf16_fp32_dtype"] = ([g.dtype for g in grads], [torch.float32] * 4)
    # bf16 forward/backward are identical in the reference, the reduction is in fp32.
    out["bf16_fp32_values"] = (grads, _reference_grads(1, world_size, torch.bfloat16))
    _, grads = _train(DistributedDataParallelConfig(), 1, rank, dtype=torch.bfloat16)
    out["bf16_dtype"] = ([g.dtype for g in grads], [torch.bfloat16] * 4)

    ddp.zero_grad_buffer()
    out["zeroed"] = ([float(p.main_grad.abs().sum()) for p in ddp.module.parameters()], [0.0] * 4)

    ddp = DistributedDataParallel(TCFG, DistributedDataParallelConfig(), _model(seed=rank))
    ddp.broadcast_params()
    out["broadcast"] = (list(ddp.module.parameters()), list(_model(seed=0).parameters()))

    frozen = _model()
    frozen[0].weight.requires_grad_(False)
    ddp = DistributedDataParallel(TCFG, DistributedDataParallelConfig(), frozen)
    out["frozen_not_buffered"] = (hasattr(frozen[0].weight, "main_grad"), False)

    ddp = DistributedDataParallel(TCFG, DistributedDataParallelConfig(check_for_nan_in_grad=True), _model())
    ddp.module[0].weight.main_grad[0, 0] = float("nan")
    try:
        ddp.finish_grad_sync()
        out["nan_error"] = ("no error", "RuntimeError")
    except RuntimeError as err:
        out["nan_error"] = (f"rank {rank}" in str(err), True)
    return out


@pytest.fixture(scope="module")
def rank_results():
    return run_on_ranks(_checks, 2)


@pytest.mark.parametrize(
    "check",
    ["average", "accumulate", "overlap", "bf16_fp32_values", "broadcast"] + COLLECTIVE_CHECKS,
)
def test_tensors_match_reference(rank_results, check):
    for res in rank_results:
        got, expected = res[check]
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g.detach().float(), e.detach().float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "check",
    ["grad_is_freed", "buckets", "no_launch_in_no_sync", "launch_in_last_backward", "bf16_fp32_dtype",
     "bf16_dtype", "zeroed", "frozen_not_buffered", "nan_error"],
)
def test_values_match(rank_results, check):
    for res in rank_results:
        got, expected = res[check]
        assert got == expected, check


def test_single_process_without_torch_distributed():
    model = _model()
    ddp = DistributedDataParallel(TCFG, DistributedDataParallelConfig(), model)
    x, y = _data(0, 0)
    _loss(ddp, x, y).backward()
    ddp.finish_grad_sync()
    for g, e in zip([p.main_grad for p in model.parameters()], _reference_grads(1, 1)):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-6)
    assert ddp.state_dict().keys() == model.state_dict().keys()


def test_distributed_optimizer_instances_need_the_distributed_optimizer_and_their_groups():
    with pytest.raises(ValueError, match="--num-distributed-optimizer-instances 2 needs --use-distributed-optimizer"):
        DistributedDataParallelConfig(num_distributed_optimizer_instances=2)
    with pytest.raises(ValueError, match="positive integer"):
        DistributedDataParallelConfig(use_distributed_optimizer=True, num_distributed_optimizer_instances=0)
    config = DistributedDataParallelConfig(use_distributed_optimizer=True, num_distributed_optimizer_instances=2)
    with pytest.raises(ValueError, match=r"hold 1 instance\(s\).*num_distributed_optimizer_instances=2"):
        DistributedDataParallel(TCFG, config, _model())
