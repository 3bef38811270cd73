"""--use-precision-aware-optimizer and --optimizer-cpu-offload.

Exactness. With fp32 dtypes the precision-aware step runs torch's AdamW on the very same
fp32 tensors (the stored state, or the master copy of a bf16/fp16 param; fp16 with its loss
scaler), and an offloaded param runs it on a CPU copy holding the same values, so params
must be bit-identical (atol 0) to the default distributed optimizer. Lower-precision moments change the update: bf16 keeps 8
mantissa bits, so after 3 steps at lr 1e-2 params stay within 5e-3 of the fp32 run (one
step moves a param by up to lr = 1e-2; a bug such as unscaled fp8 moves them by ~lr each
step and fails). Checkpoints hold unscaled fp32 values whatever the storage dtype, so they
load into any storage dtype and any bucket layout.
"""

import copy

import pytest
import torch

from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, PrecisionAwareAdamW, get_megatron_optimizer
from megatron.core.optimizer.cpu_offload import offloaded_params
from megatron.core.optimizer.param_state import load_model_space_state, model_space_state
from megatron.core.optimizer.precision_aware_adam import FP8_STORAGE_DTYPE, dequantize, quantize
from megatron.core.transformer.transformer_config import TransformerConfig
from tests.multirank import run_on_ranks

TCFG = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2)


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8)).to(dtype)


def _batch(rank, step):
    g = torch.Generator().manual_seed(1000 + 10 * step + rank)
    return torch.randn(4, 16, generator=g), torch.randn(4, 8, generator=g)


# -- one process -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype, rel", [(torch.float16, 1e-3), (FP8_STORAGE_DTYPE, 0.07)])
def test_scaled_formats_round_trip_through_a_per_tensor_scale(dtype, rel):
    """Values far outside fp16/fp8 range (1e-9 .. 1e6) survive because of the scale; E4M3
    keeps 3 mantissa bits (relative step 1/16 -> error <= 1/16 of the value, near absmax)."""
    values = torch.tensor([1e6, -3e5, 2e5, 1e5])
    out, scale = torch.empty(4, dtype=dtype), torch.zeros(())
    quantize(values, torch.uint8 if dtype == FP8_STORAGE_DTYPE else dtype, out, scale)
    assert scale.item() > 0
    torch.testing.assert_close(dequantize(out, scale), values, rtol=rel, atol=0)
    quantize(torch.zeros(4), dtype, out, scale)
    assert scale.item() == 0 and dequantize(out, scale).abs().sum() == 0


def _adamw_run(optimizer_factory, steps=3):
    model = _model()
    optimizer = optimizer_factory(model)
    for step in range(steps):
        model.zero_grad()
        x, y = _batch(0, step)
        ((model(x) - y) ** 2).sum().backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()], optimizer


def test_fp32_settings_step_exactly_as_torch_adamw_also_when_offloaded():
    kwargs = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ref, _ = _adamw_run(lambda m: torch.optim.AdamW(m.parameters(), **kwargs))

    def offloaded(model):
        opt = PrecisionAwareAdamW(model.parameters(), **kwargs)
        opt.init_storage(offload=offloaded_params(model.parameters(), 0.5))
        return opt

    got, opt = _adamw_run(offloaded)
    assert len(opt.offloaded) == 1  # the first weight (512 of 808 elements) already reaches half
    for a, b in zip(ref, got):
        assert torch.equal(a, b)


def test_offload_partition_follows_the_fraction_in_param_order():
    params = [torch.empty(n) for n in (10, 30, 60)]
    assert offloaded_params(params, 0.0) == []
    assert [p.numel() for p in offloaded_params(params, 0.1)] == [10]
    assert [p.numel() for p in offloaded_params(params, 0.3)] == [10, 30]
    assert [p.numel() for p in offloaded_params(params, 1.0)] == [10, 30, 60]
    with pytest.raises(ValueError, match="--optimizer-offload-fraction"):
        offloaded_params(params, 1.5)


def _state_bytes(optimizer):
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
               if torch.is_tensor(t) and t.dim() > 0)


@pytest.mark.parametrize("exp_avg, master, expected", [
    (torch.float32, torch.float32, 4 + 4 + 4),
    (torch.bfloat16, torch.float32, 2 + 2 + 4),
    (torch.uint8, torch.float16, 1 + 1 + 2),
])
def test_state_bytes_per_param_shrink_with_the_dtypes(exp_avg, master, expected):
    """bf16 params: master param + exp_avg + exp_avg_sq bytes per element, from tensor sizes."""
    model = _model(torch.bfloat16)
    opt = PrecisionAwareAdamW(model.parameters(), lr=1e-2, master_params_dtype=master,
                              exp_avg_dtype=exp_avg, exp_avg_sq_dtype=exp_avg)
    opt.init_storage()
    x, y = _batch(0, 0)
    ((model(x.bfloat16()).float() - y) ** 2).sum().backward()
    opt.step()
    numel = sum(p.numel() for p in model.parameters())
    assert _state_bytes(opt) == expected * numel


@pytest.mark.parametrize("kwargs, flag", [
    (dict(use_precision_aware_optimizer=True), "--use-distributed-optimizer"),
    (dict(use_precision_aware_optimizer=True, use_distributed_optimizer=True, optimizer="sgd"), "--optimizer adam"),
    (dict(exp_avg_dtype="bf16"), "--exp-avg-dtype bf16 needs --use-precision-aware-optimizer"),
    (dict(main_grads_dtype="fp16"), "--main-grads-dtype fp16 is not supported"),
    (dict(optimizer_cpu_offload=True), "--optimizer-cpu-offload must be used with --use-precision-aware"),
    (dict(optimizer_offload_fraction=-0.1), "--optimizer-offload-fraction must be in"),
])
def test_megatron_rules_are_errors_naming_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        OptimizerConfig(lr=1e-3, **kwargs)


# -- two data-parallel ranks -----------------------------------------------------------


def _build(rank, dtype, model=None, bucket_size=None, fp32_grads=True, **config):
    model = model if model is not None else _model(dtype)
    ddp_config = DistributedDataParallelConfig(
        use_distributed_optimizer=True, grad_reduce_in_fp32=fp32_grads,
        overlap_grad_reduce=bucket_size is not None, bucket_size=bucket_size)
    ddp = DistributedDataParallel(TCFG, ddp_config, model)
    opt_config = OptimizerConfig(lr=1e-2, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
                                 initial_loss_scale=2**10, clip_grad=0.05, use_distributed_optimizer=True, **config)
    return ddp, get_megatron_optimizer(opt_config, [ddp])


def _train(ddp, opt, rank, steps):
    for step in steps:
        ddp.zero_grad_buffer()
        opt.zero_grad()
        x, y = _batch(rank, step)
        dtype = next(ddp.module.parameters()).dtype
        ((ddp(x.to(dtype)).float() - y) ** 2).sum().backward()
        ddp.finish_grad_sync()
        opt.step()
    ddp.finish_param_sync()
    return [p.detach().float().clone() for p in ddp.module.parameters()]


PA = dict(use_precision_aware_optimizer=True)
LOW = dict(PA, exp_avg_dtype="bf16", exp_avg_sq_dtype="bf16")
CASES = {
    "fp32_settings": PA,
    "offload_half": dict(PA, optimizer_cpu_offload=True, optimizer_offload_fraction=0.5),
    "offload_all_bf16_states": dict(LOW, optimizer_cpu_offload=True),
    "bf16_states": LOW,
    "fp8_states_fp16_master_bf16_grads": dict(PA, exp_avg_dtype="fp8", exp_avg_sq_dtype="fp8",
                                              main_params_dtype="fp16", main_grads_dtype="bf16"),
}


def _parity(rank, out):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        ref = _train(*_build(rank, dtype), rank, range(3))
        for name, config in CASES.items():
            fp32_grads = config.get("main_grads_dtype", "fp32") == "fp32"
            got = _train(*_build(rank, dtype, fp32_grads=fp32_grads, **config), rank, range(3))
            out[(name, str(dtype))] = max((a - b).abs().max().item() for a, b in zip(ref, got))


def _checkpoints(rank, out):
    """bf16 moments, half offloaded: per-rank state, the gathered (dp-zero) state into another
    bucket layout and into fp32 storage, and the model-space state all continue identically."""
    config = dict(LOW, optimizer_cpu_offload=True, optimizer_offload_fraction=0.5)
    ddp, opt = _build(rank, torch.bfloat16, **config)
    _train(ddp, opt, rank, range(2))
    per_rank = copy.deepcopy(opt.state_dict())
    gathered = copy.deepcopy(opt.get_parameter_state_dp_zero())
    space, scalars = model_space_state(opt)
    space = {p: {k: v.clone() for k, v in entry.items()} for p, entry in space.items()}
    names = {p: n for n, p in ddp.module.named_parameters()}
    space_by_name = {names[p]: entry for p, entry in space.items()}
    out["saved_exp_avg_dtype"] = str(per_rank["param_state"][0][0]["exp_avg"].dtype)
    weights = copy.deepcopy(ddp.module.state_dict())
    expected = _train(ddp, opt, rank, [2])

    def resumed(load, **build_kwargs):
        model = _model(torch.bfloat16, seed=5)
        model.load_state_dict(weights)
        ddp2, opt2 = _build(rank, torch.bfloat16, model=model, **build_kwargs)
        load(ddp2, opt2)
        got = _train(ddp2, opt2, rank, [2])
        return max((a - b).abs().max().item() for a, b in zip(expected, got))

    out["per_rank"] = resumed(lambda d, o: o.load_state_dict(per_rank), **config)
    out["gathered_other_buckets"] = resumed(lambda d, o: o.load_parameter_state_from_dp_zero(gathered),
                                            bucket_size=200, **config)
    out["gathered_into_fp32_storage"] = resumed(lambda d, o: o.load_parameter_state_from_dp_zero(gathered),
                                                **PA)

    def load_space(d, o):
        by_param = {p: space_by_name[n] for n, p in d.module.named_parameters()}
        load_model_space_state(o, by_param, scalars)

    out["model_space"] = resumed(load_space, **config)


def _checks(rank, world):
    parallel_state.initialize_model_parallel()
    out = {}
    _parity(rank, out)
    _checkpoints(rank, out)
    return out


@pytest.fixture(scope="module")
def results():
    return run_on_ranks(_checks, 2)


@pytest.mark.parametrize("dtype", ["torch.float32", "torch.bfloat16", "torch.float16"])
@pytest.mark.parametrize("case, atol", [("fp32_settings", 0.0), ("offload_half", 0.0),
                                        ("offload_all_bf16_states", 5e-3), ("bf16_states", 5e-3),
                                        ("fp8_states_fp16_master_bf16_grads", 5e-3)])
def test_distributed_precision_aware_matches_the_default_optimizer(results, case, atol, dtype):
    for rank_out in results:
        assert rank_out[(case, dtype)] <= atol


def test_low_precision_states_do_change_the_update(results):
    """Guards the tolerance test above: bf16 moments are really stored (not fp32)."""
    assert results[0][("bf16_states", "torch.float32")] > 0


@pytest.mark.parametrize("how", ["per_rank", "gathered_other_buckets", "gathered_into_fp32_storage",
                                 "model_space"])
def test_checkpoint_round_trips_continue_identically(results, how):
    """The saved state is unscaled fp32; bf16 storage of it is exact (the values came from
    bf16), so every route resumes bit-identically."""
    for rank_out in results:
        assert rank_out["saved_exp_avg_dtype"] == "torch.float32"
        assert rank_out[how] == 0.0
