"""FP8 in the model: which linears run in FP8, the scaling state in the state dict and
the NaN check, a tiny GPT trained with the fp32 emulation tracking fp32, and TP=2 with
sequence parallelism equal to one process."""

import io

import pytest
import torch
import torch.nn.functional as F

from megatron.core.dist_checkpointing.model_sharding import global_tensor_names
from megatron.core.fp8.layer_scope import layer_runs_in_fp8
from megatron.core.fp8.scaling import Fp8Scaling
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.transformer_config import TransformerConfig, init_method_normal
from megatron.training.nan_check import NonFiniteError, check_finite
from tests.multirank import run_on_ranks

VOCAB, SEQ, BATCH, SEED = 128, 16, 2, 1234
LLAMA = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
             normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False)


def _config(**kw):
    base = dict(LLAMA, use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0)
    base.update(kw)
    return TransformerConfig(**base)


def _fp8(**kw):
    return _config(fp8="hybrid", fp8_emulation=True, **kw)


def _build(config):
    torch.manual_seed(SEED)
    return GPTModel(config, vocab_size=VOCAB, max_sequence_length=SEQ, parallel_output=False,
                    position_embedding_type="rope", share_embeddings_and_output_weights=False)


def _fp8_linears(model):
    return [name for name, m in model.named_modules() if isinstance(m, Fp8Scaling)]


def _data(seed=7):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen), torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)


def test_layer_selection_first_last_in_bf16():
    config = _fp8(num_layers=6, first_last_layers_bf16=True, num_layers_at_start_in_bf16=2,
                  num_layers_at_end_in_bf16=1)
    assert [layer_runs_in_fp8(config, n) for n in range(1, 7)] == [False, False, True, True, True, False]
    assert all(layer_runs_in_fp8(_fp8(num_layers=6), n) for n in range(1, 7))
    assert not layer_runs_in_fp8(_config(num_layers=6), 3)


def test_only_the_transformer_layers_linears_run_in_fp8():
    model = _build(_fp8())
    names = _fp8_linears(model)
    # qkv, proj, fc1, fc2 of both layers; never the output layer
    assert len(names) == 8 and not any("output_layer" in n for n in names)
    assert all(n.startswith("decoder.layers.") for n in names)
    outside = ColumnParallelLinear(8, 16, config=_fp8(), init_method=init_method_normal(0.02), bias=False)
    assert outside.fp8 is None


def test_all_layers_in_bf16_gives_the_plain_model_exactly():
    ids, labels = _data()
    plain = _build(_config())(ids, None, None, labels=labels)
    kept = _build(_fp8(first_last_layers_bf16=True))  # 2 layers: both kept out of FP8
    assert not _fp8_linears(kept)
    assert torch.equal(kept(ids, None, None, labels=labels), plain)
    assert set(kept.state_dict()) == set(_build(_config()).state_dict())


def test_scaling_state_is_saved_loaded_and_checkpointed():
    model = _build(_fp8(fp8_amax_history_len=4, fp8_amax_compute_algo="max"))
    ids, labels = _data()
    model(ids, None, None, labels=labels).sum().backward()
    state = model.state_dict()
    key = "decoder.layers.0.mlp.linear_fc1.fp8.amax_history"
    assert state[key].shape == (4, 3) and state[key].abs().sum() > 0
    names = set(global_tensor_names(model).values())
    assert key in names and "decoder.layers.1.self_attention.linear_proj.fp8.scale" in names
    buffer = io.BytesIO()
    torch.save(state, buffer)
    fresh = _build(_fp8(fp8_amax_history_len=4, fp8_amax_compute_algo="max"))
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    assert torch.equal(fresh.state_dict()[key], state[key])
    ids2, labels2 = _data(8)
    assert torch.equal(fresh(ids2, None, None, labels=labels2), model(ids2, None, None, labels=labels2))


def test_nan_check_covers_the_fp8_scales():
    model = _build(_fp8())
    loss = [torch.tensor(1.0)]
    check_finite(loss, [model], iteration=3)
    model.decoder.layers[1].mlp.linear_fc2.fp8.scale[0] = float("inf")
    with pytest.raises(NonFiniteError, match="iteration 3: NaN/Inf in the FP8 amax history or scales on rank"):
        check_finite(loss, [model], iteration=3)


def _train(config, steps):
    model = _build(config)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    ids, labels = _data()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(ids, None, None, labels=labels).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_tiny_gpt_trains_in_fp8_emulation_and_tracks_fp32():
    """All runs memorise one batch; FP8 rounds every GEMM operand to 3 mantissa bits (e4m3,
    relative error up to 1/16) and gradients to 2 (e5m2), so the curves are not equal, but
    they must stay close: within 2% of the fp32 loss at every step (measured: 0.5%). A broken FP8 path (wrong
    scale, a transposed operand, a dropped gradient) diverges by far more or does not learn."""
    steps = 12
    ref = _train(_config(), steps)
    for recipe in ("delayed", "tensorwise"):
        fp8 = _train(_fp8(fp8_recipe=recipe, fp8_amax_history_len=4, fp8_amax_compute_algo="max"), steps)
        assert fp8[-1] < 0.6 * fp8[0], f"{recipe}: {fp8}"
        for step, (a, b) in enumerate(zip(fp8, ref)):
            assert abs(a - b) <= 0.02 * b, f"{recipe} step {step}: fp8 loss {a:.4f} vs fp32 {b:.4f}"
        assert fp8 != ref  # the FP8 path was really taken


def _tp_run(rank, world, sequence_parallel):
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(world)
    model = _build(_fp8(tensor_model_parallel_size=world, sequence_parallel=sequence_parallel))
    ids, labels = _data()
    loss = model(ids, None, None, labels=labels)
    loss.sum().backward()
    fc1 = model.decoder.layers[0].mlp.linear_fc1
    return dict(loss=loss.detach(), scale=fc1.fp8.scale.clone(), history=fc1.fp8.amax_history.clone())


def test_tensor_and_sequence_parallel_equal_one_process():
    """TP=2 with SP against TP=1, both in FP8. Amaxes are reduced over the TP group, so
    every rank quantizes with the one-process scales and the scaling state is the same on
    every rank (replicated in checkpoints). Results then differ only where TP's reordered
    fp32 sums move a value across an FP8 rounding boundary, which is rare and shifts one
    element by an FP8 step: the per-token losses agree to 1e-3 relative."""
    model = _build(_fp8())
    ids, labels = _data()
    loss = model(ids, None, None, labels=labels)
    loss.sum().backward()
    fc1 = model.decoder.layers[0].mlp.linear_fc1
    single = dict(loss=loss.detach(), scale=fc1.fp8.scale)
    results = run_on_ranks(_tp_run, 2, args=(True,))
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["loss"], single["loss"], rtol=1e-3, atol=1e-4,
                                   msg=lambda m: f"rank {rank}: {m}")
        torch.testing.assert_close(result["scale"], single["scale"], rtol=1e-3, atol=0)
    assert torch.equal(results[0]["history"], results[1]["history"])


def test_fp8_on_cpu_without_emulation_is_refused_when_the_model_is_built():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU refusal")
    with pytest.raises(ValueError, match="--fp8-format needs a CUDA GPU with FP8 GEMMs.*--fp8-emulation"):
        _build(_config(fp8="hybrid"))
