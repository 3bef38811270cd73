"""The distributed optimizer against one process, its state, and its memory per param.

Reference: one process keeps the whole model and, each step, averages the grads that
the dp ranks' batches give (each batch's backward separately, summed in fp32, /dp),
then steps Megatron's replicated optimizer. The distributed run reduce-scatters the
same grads, steps 1/dp of every bucket per rank and all-gathers.

Tolerances. fp32, clipping active: the grads are the same fp32 sums in another order
and the grad norm is summed per shard instead of per param (~1e-7 relative), which
Adam carries over 3 steps; atol 2e-6 at lr 1e-2 is 1e3 x that drift and 1/5000 of one
step. bf16, no clipping: bf16 grads summed in fp32 are exact and Adam is elementwise,
so the params must be bit-identical (atol 0).

Also: an fp16 overflow in one rank's shard skips the step on all ranks; the per-rank
state round-trips; the gathered (dp-zero) state reshards dp=2 -> dp=1 -> dp=2 exactly;
the bytes per param are 6 + 12/dp.
"""

import copy

import pytest
import torch

from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import DistributedOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.process_groups import ProcessGroups
from megatron.core.transformer.transformer_config import TransformerConfig
from tests.multirank import run_on_ranks

TCFG = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2)
STEPS = 3


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8)).to(dtype)


def _data(rank, step):
    g = torch.Generator().manual_seed(1000 + 10 * step + rank)
    return torch.randn(4, 16, generator=g), torch.randn(4, 8, generator=g)


def _loss(model, x, y):
    dtype = next(model.parameters()).dtype
    return ((model(x.to(dtype)).float() - y) ** 2).sum()


def _opt_config(dtype, clip_grad, distributed):
    return OptimizerConfig(lr=1e-2, bf16=dtype == torch.bfloat16, clip_grad=clip_grad,
                           use_distributed_optimizer=distributed)


def _reference(world, dtype, clip_grad):
    """(final params, grad norms) of one process averaging every rank's grads."""
    model = _model(dtype)
    opt = get_megatron_optimizer(_opt_config(dtype, clip_grad, False), model)
    norms = []
    for step in range(STEPS):
        acc = [torch.zeros_like(p, dtype=torch.float32) for p in model.parameters()]
        for r in range(world):
            model.zero_grad(set_to_none=True)
            _loss(model, *_data(r, step)).backward()
            for a, p in zip(acc, model.parameters()):
                a.add_(p.grad.float())
        for a, p in zip(acc, model.parameters()):
            p.grad = None
            p.main_grad = (a / world).to(torch.float32 if dtype == torch.bfloat16 else dtype)
        norms.append(opt.step()[1])
    return [p.detach().float().clone() for p in model.parameters()], norms


def _distributed(rank, dtype, clip_grad, ddp_kwargs, model=None):
    model = model if model is not None else _model(dtype)
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True, **ddp_kwargs)
    ddp = DistributedDataParallel(TCFG, ddp_config, model)
    opt = get_megatron_optimizer(_opt_config(dtype, clip_grad, True), [ddp])
    return ddp, opt


def _train(ddp, opt, rank, steps, probe=None):
    norms = []
    for step in steps:
        ddp.zero_grad_buffer()
        opt.zero_grad()
        _loss(ddp, *_data(rank, step)).backward()
        ddp.finish_grad_sync()
        norms.append(opt.step()[1])
        if probe is not None:
            probe(step)
    ddp.finish_param_sync()
    return norms


def _params(ddp):
    return [p.detach().float().clone() for p in ddp.module.parameters()]


def _parity(rank, world, out):
    for name, dtype, clip, kwargs in (
        ("fp32_clipped", torch.float32, 0.05, {}),
        ("bf16", torch.bfloat16, 1e3, {}),
        ("fp32_overlap", torch.float32, 0.05,
         {"overlap_grad_reduce": True, "overlap_param_gather": True, "bucket_size": 200}),
    ):
        pending = {}
        ddp, opt = _distributed(rank, dtype, clip, kwargs)

        def probe(step, ddp=ddp, pending=pending):
            pending[step] = [b.param_gather_handle is not None for buf in ddp.buffers for b in buf.buckets]

        norms = _train(ddp, opt, rank, range(STEPS), probe)
        out[name] = (_params(ddp), norms, _reference(world, dtype, clip))
        out[name + "_buckets"] = len(ddp.buffers[0].buckets)
        out[name + "_async_gather_pending"] = pending[0]
        out[name + "_optimizer_numel"] = sum(p.numel() for p in opt.get_parameters())


def _state_round_trip(rank, world, out):
    ddp, opt = _distributed(rank, torch.float32, 0.05, {})
    _train(ddp, opt, rank, range(2))
    state = copy.deepcopy(opt.state_dict())
    out["state_keys"] = sorted(state["param_state"][0][0])
    out["state_block_numel"] = state["param_state"][0][0]["param"].numel()
    out["state_sharding"] = (state["sharding"]["dp_size"], state["sharding"]["dp_rank"],
                             [p["name"] for p in state["sharding"]["buffers"][0]["params"]])
    fresh_model = _model(seed=7)
    fresh_model.load_state_dict(ddp.module.state_dict())
    ddp2, opt2 = _distributed(rank, torch.float32, 0.05, {}, model=fresh_model)
    opt2.load_state_dict(state)
    _train(ddp, opt, rank, [2])
    _train(ddp2, opt2, rank, [2])
    out["resumed"] = (_params(ddp2), _params(ddp))
    bad = copy.deepcopy(state)
    bad["sharding"]["dp_size"] = world + 1
    try:
        opt2.load_state_dict(bad)
        out["bad_layout_error"] = ""
    except ValueError as err:
        out["bad_layout_error"] = str(err)


def _pieces(opt):
    """{param name: (param piece range, main values, exp_avg, exp_avg_sq)} of this rank."""
    names = opt._param_names()
    out = {}
    for shard in opt._all_shards():
        state = opt.optimizer.state[shard.main_param]
        out[names[shard.model_param]] = (shard.range.param, shard.main_param.detach().view(-1).clone(),
                                          state["exp_avg"].view(-1).clone(), state["exp_avg_sq"].view(-1).clone())
    return out


def _single_replica(ddp):
    """A dp=1 copy of ``ddp``'s model with another bucket layout, on this rank alone."""
    model = _model(seed=7)
    model.load_state_dict(ddp.module.state_dict())
    config = DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True,
                                           overlap_grad_reduce=True, bucket_size=100)
    single_ddp = DistributedDataParallel(TCFG, config, model, pg_collection=ProcessGroups())
    return get_megatron_optimizer(_opt_config(torch.float32, 0.05, True), [single_ddp], pg_collection=ProcessGroups())


def _reshard(rank, world, out):
    """dp=2 -> gathered -> dp=1 (other buckets) -> gathered -> a fresh dp=2 run."""
    ddp, opt = _distributed(rank, torch.float32, 0.05, {})
    _train(ddp, opt, rank, range(2))
    full = opt.get_parameter_state_dp_zero()
    out["dp_zero_numel"] = (full["per_bucket_numel"], full["per_bucket_numel_unpadded"])
    single = _single_replica(ddp)
    single.load_parameter_state_from_dp_zero(full)
    whole = _pieces(single)
    mismatched = []
    for name, ((lo, hi), *values) in _pieces(opt).items():
        if not all(torch.equal(v, w[lo:hi]) for v, w in zip(values, whole[name][1:])):
            mismatched.append(name)
    out["dp1_has_dp2_pieces"] = mismatched
    fresh_model = _model(seed=9)
    fresh_model.load_state_dict(ddp.module.state_dict())
    ddp3, opt3 = _distributed(rank, torch.float32, 0.05, {}, model=fresh_model)
    opt3.load_parameter_state_from_dp_zero(single.get_parameter_state_dp_zero())
    _train(ddp, opt, rank, [2])
    _train(ddp3, opt3, rank, [2])
    out["resharded_resume"] = (_params(ddp3), _params(ddp))


def _fp16_overflow(rank, world, out):
    """An Inf in rank 0's grad shard only must skip the step on every rank."""
    ddp = DistributedDataParallel(TCFG, DistributedDataParallelConfig(use_distributed_optimizer=True),
                                  _model(torch.float16))
    config = OptimizerConfig(lr=1e-2, fp16=True, initial_loss_scale=1024.0, hysteresis=1,
                             use_distributed_optimizer=True)
    opt = get_megatron_optimizer(config, [ddp])
    results = []
    for step in range(2):
        before = _params(ddp)
        ddp.zero_grad_buffer()
        opt.zero_grad()
        opt.scale_loss(_loss(ddp, *_data(rank, step))).backward()
        ddp.finish_grad_sync()
        if step == 0 and rank == 0:
            ddp.buffers[0].buckets[0].grad_shard[0] = float("inf")
        updated = opt.step()[0]
        ddp.finish_param_sync()
        changed = any(not torch.equal(a, b) for a, b in zip(before, _params(ddp)))
        results.append((updated, changed, float(opt.get_loss_scale())))
    out["fp16_overflow"] = results


def _checks(rank, world):
    parallel_state.initialize_model_parallel()
    out = {}
    _fp16_overflow(rank, world, out)
    _parity(rank, world, out)
    _state_round_trip(rank, world, out)
    _reshard(rank, world, out)
    out["bytes"] = _bytes_per_param()
    return out


@pytest.fixture(scope="module")
def results():
    return run_on_ranks(_checks, 2)


@pytest.mark.parametrize("case, atol", [("fp32_clipped", 2e-6), ("bf16", 0.0), ("fp32_overlap", 2e-6)])
def test_matches_single_process(results, case, atol):
    for res in results:
        params, norms, (ref_params, ref_norms) = res[case]
        for got, ref in zip(params, ref_params, strict=True):
            torch.testing.assert_close(got, ref, rtol=0, atol=atol)
        assert norms == pytest.approx(ref_norms, rel=1e-6)
    # The clipped runs really clip: the norm is far above 0.05.
    assert min(results[0]["fp32_clipped"][1]) > 0.5


def test_state_is_sharded(results):
    total = sum(p.numel() for p in _model().parameters())
    for case in ("fp32_clipped", "bf16"):
        owned = [res[case + "_optimizer_numel"] for res in results]
        assert sum(owned) == total and max(owned) < total


def test_overlap_buckets_and_async_gather(results):
    for res in results:
        # Reverse order 8, 256 | 32, 512 elements (64-aligned), closing at >= 200: 2 buckets.
        assert res["fp32_overlap_buckets"] == 2
        # After the step every bucket's all-gather is still in flight; forward waits for it.
        assert res["fp32_overlap_async_gather_pending"] == [True] * 2


def test_fp16_overflow_on_one_shard_skips_everywhere(results):
    for res in results:
        # Step 1 overflows (rank 0's shard): skipped, scale halved; step 2 is clean.
        assert res["fp16_overflow"] == [(False, False, 512.0), (True, True, 512.0)]


def test_state_dict_round_trip(results):
    for rank, res in enumerate(results):
        assert res["state_keys"] == ["exp_avg", "exp_avg_sq", "param"]
        assert res["state_sharding"][:2] == (2, rank)
        assert res["state_sharding"][2] == ["2.bias", "2.weight", "0.bias", "0.weight"]  # reverse order
        for got, ref in zip(*res["resumed"], strict=True):
            assert torch.equal(got, ref)
        assert "--no-load-optim" in res["bad_layout_error"] and "dp_size=3" in res["bad_layout_error"]


def test_reshard_over_dp_through_the_gathered_state(results):
    for res in results:
        # One bucket: 8 at 0, 256 at 64, 32 at 320, 512 at 384 (64-aligned) ends at 896,
        # already a multiple of lcm(2, 128).
        assert res["dp_zero_numel"] == ([[896]], [[896]])
        assert res["dp1_has_dp2_pieces"] == []
        for got, ref in zip(*res["resharded_resume"], strict=True):
            assert torch.equal(got, ref)


def _bytes_per_param():
    """(bytes, params) of model params, grad buffers and optimizer state on this rank.

    bf16 Linear layers with 3 x 64 x 64 params: no padding for dp in {1, 2, 4}, so the
    bytes must be exactly (2 + 4 + 12/dp) per param. Storages are counted once each by
    their element size (not allocator stats); Adam's 0-dim step counters are excluded.
    """
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64, bias=False) for _ in range(3)]).to(torch.bfloat16)
    ddp = DistributedDataParallel(
        TCFG, DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True), model)
    opt = get_megatron_optimizer(OptimizerConfig(lr=1e-3, bf16=True, use_distributed_optimizer=True), [ddp])
    assert isinstance(opt, DistributedOptimizer)
    ddp.zero_grad_buffer()
    ddp(torch.randn(8, 64, dtype=torch.bfloat16)).float().square().sum().backward()
    ddp.finish_grad_sync()
    opt.step()
    storages = {}

    def count(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    for p in model.parameters():
        count(p)
        count(p.main_grad)
        assert p.grad is None
    for main in opt.get_parameters():
        count(main)
        for value in opt.optimizer.state[main].values():
            if torch.is_tensor(value) and value.dim() > 0:
                count(value)
    return sum(storages.values()), sum(p.numel() for p in model.parameters())


def _bytes_only(rank, world):
    parallel_state.initialize_model_parallel()
    return _bytes_per_param()


def _bytes_on_fake_ranks(world, rank):
    """The byte count of ``rank`` in a ``world``-rank layout, in this process, over
    torch's fake process group (collectives are no-ops: sizes are what matters, as with
    Megatron's --fake-process-group); 4 real ranks when that group is unavailable."""
    import torch.distributed as dist

    try:
        from torch.testing._internal.distributed.fake_pg import FakeStore
    except ImportError:
        return run_on_ranks(_bytes_only, world)
    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    try:
        parallel_state.initialize_model_parallel()
        return [_bytes_per_param()]
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def test_memory_is_6_plus_12_over_dp_bytes_per_param(results):
    measured = {1: [_bytes_per_param()], 2: [r["bytes"] for r in results], 4: _bytes_on_fake_ranks(4, 3)}
    for dp, per_rank in measured.items():
        for nbytes, numel in per_rank:
            assert nbytes == (6 + 12 // dp) * numel, (dp, nbytes / numel)
