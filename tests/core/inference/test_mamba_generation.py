"""Generation for Mamba-2 and hybrid models: the recurrent state (conv + SSM) of the Mamba
layers and the KV cache of the attention layers, through the static engine.

Models: the tiny random-init Hugging Face cases of tests/core/models (fp32, hidden 32):
``Mamba2ForCausalLM`` (2 Mamba layers) and ``NemotronHForCausalLM`` (pattern M-*M),
imported through the converter's HF mappings. Tolerance 1e-5 on logits: the cached step
and the full forward's chunked scan do the same fp32 math in another order (~1e-6 on
logits of magnitude ~1); a state that misses a token, a conv window off by one position
or a wrong decay moves logits by > 1e-3.
"""

import pytest
import torch

from megatron.core.inference import (
    DynamicInferenceEngine,
    InferenceRequest,
    SamplingParams,
    StaticInferenceContext,
    StaticInferenceEngine,
)
from megatron.core.inference.cuda_graphs import decode_graph_supported
from megatron.core.ssm.causal_conv1d import causal_conv1d_reference
from megatron.core.ssm.mamba_recurrence import conv_state_of, conv_step, final_ssm_state, ssm_step
from megatron.core.ssm.ssd_reference import ssd_sequential
from tests.core.inference.fixed_shape_decoding import assert_fixed_shape_decoding_matches
from tests.core.models import test_mamba_hf_parity as mamba2_case
from tests.core.models import test_mamba_nemotron_h_parity as nemotron_case

TOL = dict(atol=1e-5, rtol=1e-5)
VOCAB = mamba2_case.VOCAB


@pytest.fixture(scope="module")
def models():
    mamba2 = mamba2_case._hf(tied=False, n_groups=2, seed=0)
    nemotron = nemotron_case.hf.__wrapped__()
    return {"mamba2": (mamba2, mamba2_case._ours(mamba2)), "nemotron_h": (nemotron, nemotron_case._ours(nemotron))}


def _ids(batch, length, seed):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _greedy(n, **kw):
    return SamplingParams(top_k=1, num_tokens_to_generate=n, **kw)


def test_final_state_and_steps_equal_the_sequential_recurrence():
    """fp64: the prefill's final state, and the step continuing from it, equal the
    definition (ssd_sequential) over the whole sequence; the conv window likewise."""
    gen = torch.Generator().manual_seed(0)
    b, l, h, p, g, n = 2, 9, 4, 3, 2, 5
    x, B, C = (torch.randn(b, l, h, p, generator=gen, dtype=torch.float64),
               torch.randn(b, l, g, n, generator=gen, dtype=torch.float64),
               torch.randn(b, l, g, n, generator=gen, dtype=torch.float64))
    dt = torch.rand(b, l, h, generator=gen, dtype=torch.float64)
    A, D = -torch.rand(h, generator=gen, dtype=torch.float64) * 3, torch.randn(h, generator=gen, dtype=torch.float64)
    y_all, state_all = ssd_sequential(x, dt, A, B, C, D, return_final_states=True)
    _, state_6 = ssd_sequential(x[:, :6], dt[:, :6], A, B[:, :6], C[:, :6], D, return_final_states=True)
    state = final_ssm_state(x[:, :6], dt[:, :6], A, B[:, :6]).double()
    torch.testing.assert_close(state, state_6)
    for t in range(6, l):
        y = ssm_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        torch.testing.assert_close(y, y_all[:, t])
    torch.testing.assert_close(state, state_all)

    xbc = torch.randn(b, l, 7, generator=gen, dtype=torch.float64)
    weight = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    bias = torch.randn(7, generator=gen, dtype=torch.float64)
    full = causal_conv1d_reference(xbc.transpose(1, 2), weight, bias, "silu").transpose(1, 2)
    for prefill in (1, 2, 5):  # shorter than the kernel's window too: zeros, as the causal padding
        conv_state = conv_state_of(xbc[:, :prefill], 4)
        for t in range(prefill, l):
            torch.testing.assert_close(conv_step(conv_state, xbc[:, t], weight, bias), full[:, t])


@pytest.mark.parametrize("name", ["mamba2", "nemotron_h"])
@pytest.mark.parametrize("prefill", [2, 7])
def test_cached_logits_equal_full_forward(models, name, prefill):
    """Prefill, a block of 6 more tokens continuing from the state (as a prompt prefilled in
    chunks), then one token at a time up to 20: every forward's logits equal those of the
    full sequence (a prefill of 2 is shorter than the conv window of 3)."""
    _, ours = models[name]
    ids = _ids(2, 20, seed=3)
    with torch.no_grad():
        full = ours(ids, None, None)
        context = StaticInferenceContext(2, 20)
        steps = [(0, prefill), (prefill, prefill + 6)] + [(p, p + 1) for p in range(prefill + 6, 20)]
        for start, end in steps:
            got = ours(ids[:, start:end], torch.arange(start, end).expand(2, -1), None, inference_context=context)
            context.increment(end - start)
            torch.testing.assert_close(got, full[:, start:end], **TOL)


@pytest.mark.parametrize("name", ["mamba2", "nemotron_h"])
def test_greedy_generation_equals_hf_generate(models, name):
    hf, ours = models[name]
    ids = _ids(1, 6, seed=7)
    expected = hf.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 6:]
    result = StaticInferenceEngine(ours, 2, 32).generate([InferenceRequest(ids[0].tolist(), _greedy(16))])[0]
    assert result.generated_tokens == expected.tolist()


@pytest.mark.parametrize("name", ["mamba2", "nemotron_h"])
def test_mixed_length_batch_equals_each_prompt_alone(models, name):
    _, ours = models[name]
    engine = StaticInferenceEngine(ours, 4, 32)
    prompts = [_ids(1, n, seed=n)[0].tolist() for n in (2, 9, 5)]
    params = [_greedy(6 + i, return_log_probs=True) for i in range(3)]
    batch = engine.generate([InferenceRequest(p, s) for p, s in zip(prompts, params)])
    for prompt, param, got in zip(prompts, params, batch):
        alone = engine.generate([InferenceRequest(prompt, param)])[0]
        assert got.generated_tokens == alone.generated_tokens
        assert len(got.generated_tokens) == param.num_tokens_to_generate
        torch.testing.assert_close(torch.tensor(got.prompt_log_probs + got.generated_log_probs),
                                   torch.tensor(alone.prompt_log_probs + alone.generated_log_probs), **TOL)


@pytest.mark.parametrize("name", ["mamba2", "nemotron_h"])
def test_dynamic_batching_with_requests_arriving_mid_stream_equals_each_alone(models, name):
    """Continuous batching: each request's state lives in its own slot; prompts of 6-9 tokens
    are prefilled in chunks (a step budget of 5) next to other requests' decode tokens."""
    _, ours = models[name]
    greedy = dict(top_k=1, return_log_probs=True)
    requests = [InferenceRequest(_ids(1, 9, seed=1)[0].tolist(), SamplingParams(num_tokens_to_generate=10, **greedy)),
                InferenceRequest(_ids(1, 3, seed=2)[0].tolist(), SamplingParams(num_tokens_to_generate=6, **greedy)),
                InferenceRequest(_ids(1, 6, seed=3)[0].tolist(), SamplingParams(num_tokens_to_generate=8, **greedy))]
    static = StaticInferenceEngine(ours, 1, 32)
    alone = [static.generate([r])[0] for r in requests]
    engine = DynamicInferenceEngine(ours, max_requests=3, num_blocks=24, block_size=4, max_tokens_per_step=5,
                                    max_sequence_length=32)
    ids = [engine.add_request(requests[0])]
    results = {}
    for _ in range(3):  # request 0 is prefilled in two chunks and starts decoding alone
        results.update(engine.step())
    ids += [engine.add_request(r) for r in requests[1:]]
    while engine.has_unfinished_requests():
        results.update(engine.step())
    for request_id, expected in zip(ids, alone):
        got = results[request_id]
        assert got.generated_tokens == expected.generated_tokens
        torch.testing.assert_close(torch.tensor(got.prompt_log_probs + got.generated_log_probs),
                                   torch.tensor(expected.prompt_log_probs + expected.generated_log_probs), **TOL)
    assert not engine.context.recurrent_states  # finished requests leave no state behind


def test_cuda_graph_decode_takes_mamba_layers(models):
    """Mamba layers no longer keep a model off CUDA-graph decoding (the graph's warm-ups put
    the recurrent states back; tests/core/inference/test_mamba_generation_gpu.py checks
    graphed against eager decoding): on the CPU the only reason left is the device."""
    _, ours = models["nemotron_h"]
    assert decode_graph_supported(ours, model_parallel=False) == "the model is not on a CUDA device"


def test_decode_without_prefill_is_refused(models):
    _, ours = models["mamba2"]
    context = StaticInferenceContext(1, 8)
    context.increment(3)
    with pytest.raises(ValueError, match="prefill"), torch.no_grad():
        ours(_ids(1, 1, seed=0), None, None, inference_context=context)


def test_reused_context_keeps_its_state_tensors(models):
    """A context reused for a next batch (as a kept CUDA graph needs) gets that batch's
    states written into the tensors it already holds, and decodes that batch's logits."""
    _, ours = models["nemotron_h"]
    context = StaticInferenceContext(2, 16)
    held = []

    def same_state_tensors(ctx):
        held.append({key: [t.data_ptr() for t in pair] for key, pair in ctx.recurrent_states.items()})
        assert held[-1] == held[0]

    for batch_seed in (0, 1):
        context.reset()
        assert_fixed_shape_decoding_matches(ours, _ids(2, 12, seed=batch_seed), context, 5,
                                            dict(atol=1e-5, rtol=1e-5), same_state_tensors)
