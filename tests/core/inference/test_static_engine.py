"""The static engine: greedy generation equals Hugging Face ``generate``; the KV cache
gives the logits of a full forward; batching, log-probs, stops and seeds.

Models: the tiny random-init HF cases of tests/core/models (fp32, 2 layers, hidden 64),
imported through the converter's HF mapping. Tolerance 1e-5 on logits: the cached and
the full forward do the same fp32 math in a different order (one query row against cached
keys vs a causal square), which differs by float32 rounding (~1e-6 on logits of magnitude
~3); a wrong position, window or cache slot changes logits by > 1e-2.
"""

import pytest
import torch

from megatron.core.inference import InferenceRequest, SamplingParams, StaticInferenceContext, StaticInferenceEngine
from tests.core.inference.fixed_shape_decoding import assert_fixed_shape_decoding_matches
from tests.core.models.hf_cases import hf_model, megatron_model, tokens
from tests.core.models.test_moe_hf_parity import _hf_model as moe_hf_model

TOL = dict(atol=1e-5, rtol=1e-5)
PROMPT, NEW = 5, 20  # Mistral's window is 8: the output runs well past it


@pytest.fixture(scope="module")
def models():
    cases = {name: hf_model(name) for name in ("gpt2", "llama", "mistral", "qwen2")}
    cases["mixtral"] = moe_hf_model("mixtral")
    return {name: (hf, megatron_model(hf)[0]) for name, hf in cases.items()}


def _greedy(n, **kw):
    return SamplingParams(top_k=1, num_tokens_to_generate=n, **kw)


@pytest.mark.parametrize("name", ["gpt2", "llama", "mistral", "qwen2", "mixtral"])
def test_greedy_generation_equals_hf_generate(models, name):
    hf, ours = models[name]
    ids = tokens(1, PROMPT, seed=7)
    expected = hf.generate(ids, max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)[0, PROMPT:]
    result = StaticInferenceEngine(ours, 2, 32).generate([InferenceRequest(ids[0].tolist(), _greedy(NEW))])[0]
    assert result.generated_tokens == expected.tolist()
    assert result.finish_reason == "length"


@pytest.mark.parametrize("name", ["gpt2", "mistral", "mixtral"])
def test_kv_cache_logits_equal_full_forward(models, name):
    """Prefill 6 tokens, then decode one at a time up to 24: at every step the cached
    forward's logits equal those of the full sequence (window 8 is exceeded)."""
    _, ours = models[name]
    ids = tokens(2, 24, seed=3)
    with torch.no_grad():
        full = ours(ids, None, None)
        context = StaticInferenceContext(2, 24, ours.config.window_size)
        steps = [(0, 6)] + [(p, p + 1) for p in range(6, 24)]
        for start, end in steps:
            positions = torch.arange(start, end).expand(2, -1)
            got = ours(ids[:, start:end], positions, None, inference_context=context)
            context.increment(end - start)
            torch.testing.assert_close(got, full[:, start:end], **TOL)


def test_mixed_length_batch_equals_each_prompt_alone(models):
    _, ours = models["llama"]
    engine = StaticInferenceEngine(ours, 4, 32)
    prompts = [tokens(1, n, seed=n)[0].tolist() for n in (3, 9, 6)]
    params = [_greedy(8 + i, return_log_probs=True) for i in range(3)]
    batch = engine.generate([InferenceRequest(p, s) for p, s in zip(prompts, params)])
    for prompt, param, got in zip(prompts, params, batch):
        alone = engine.generate([InferenceRequest(prompt, param)])[0]
        assert got.generated_tokens == alone.generated_tokens and len(got.generated_tokens) == param.num_tokens_to_generate
        torch.testing.assert_close(torch.tensor(got.prompt_log_probs), torch.tensor(alone.prompt_log_probs), **TOL)
        torch.testing.assert_close(torch.tensor(got.generated_log_probs), torch.tensor(alone.generated_log_probs), **TOL)


def test_log_probs_equal_log_softmax_of_full_forward(models):
    _, ours = models["qwen2"]
    engine = StaticInferenceEngine(ours, 2, 32)
    prompt = tokens(1, 7, seed=11)[0].tolist()
    result = engine.generate([InferenceRequest(prompt, _greedy(6, return_log_probs=True))])[0]
    sequence = torch.tensor([prompt + result.generated_tokens])
    with torch.no_grad():
        log_probs = torch.log_softmax(ours(sequence, None, None)[0, :-1], dim=-1)
    expected = log_probs.gather(1, sequence[0, 1:, None])[:, 0]
    got = torch.tensor(result.prompt_log_probs + result.generated_log_probs)
    torch.testing.assert_close(got, expected, **TOL)
    # greedy picks the most likely token, so its log-prob is the row's maximum
    torch.testing.assert_close(got[len(prompt) - 1 :], log_probs[len(prompt) - 1 :].max(dim=-1).values, **TOL)


def test_top_logprobs_equal_the_best_of_a_full_forward(models):
    """Alternatives per position (OpenAI's logprobs / top_logprobs) for prompt and generated
    tokens, beside a request of the same batch that asks for none."""
    _, ours = models["llama"]
    engine = StaticInferenceEngine(ours, 2, 32)
    prompt = tokens(1, 7, seed=12)[0].tolist()
    other = tokens(1, 4, seed=13)[0].tolist()
    with_top, without = engine.generate([InferenceRequest(prompt, _greedy(5, return_log_probs=True, top_logprobs=3)),
                                         InferenceRequest(other, _greedy(5, return_log_probs=True))])
    assert without.prompt_top_log_probs is None and without.generated_top_log_probs is None
    sequence = torch.tensor([prompt + with_top.generated_tokens])
    with torch.no_grad():
        log_probs = torch.log_softmax(ours(sequence, None, None)[0, :-1], dim=-1)
    values, ids = log_probs.topk(3, dim=-1)
    got = with_top.prompt_top_log_probs + with_top.generated_top_log_probs
    assert len(with_top.prompt_top_log_probs) == len(prompt) - 1 and len(with_top.generated_top_log_probs) == 5
    assert [[t for t, _ in position] for position in got] == ids.tolist()
    torch.testing.assert_close(torch.tensor([[v for _, v in position] for position in got]), values, **TOL)
    # greedy: each generated token is its position's best alternative
    assert [position[0][0] for position in with_top.generated_top_log_probs] == with_top.generated_tokens
    with pytest.raises(ValueError, match="top_logprobs needs return_log_probs"):
        SamplingParams(top_logprobs=2)
    with pytest.raises(ValueError, match="between 0 and 20"):
        SamplingParams(top_logprobs=21, return_log_probs=True)


def test_score_only_request_generates_nothing(models):
    _, ours = models["gpt2"]
    engine = StaticInferenceEngine(ours, 2, 32)
    prompts = [tokens(1, 10, seed=1)[0].tolist(), tokens(1, 4, seed=2)[0].tolist()]
    params = SamplingParams(num_tokens_to_generate=0, return_log_probs=True)
    scored = engine.generate([InferenceRequest(p, params) for p in prompts])
    for prompt, result in zip(prompts, scored):
        assert result.generated_tokens == [] and len(result.prompt_log_probs) == len(prompt) - 1
        with torch.no_grad():
            log_probs = torch.log_softmax(ours(torch.tensor([prompt]), None, None)[0, :-1], dim=-1)
        expected = log_probs.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(result.prompt_log_probs), expected, **TOL)


def test_stop_token_and_stop_string_end_generation(models):
    _, ours = models["qwen2"]
    prompt = tokens(1, 5, seed=7)[0].tolist()
    free = StaticInferenceEngine(ours, 2, 32).generate([InferenceRequest(prompt, _greedy(NEW))])[0].generated_tokens
    stop_id = free[4]
    first = free.index(stop_id)
    stopped = StaticInferenceEngine(ours, 2, 32).generate([InferenceRequest(prompt, _greedy(NEW, stop_token_ids=(stop_id,)))])[0]
    assert stopped.generated_tokens == free[: first + 1] and stopped.finish_reason == "stop"

    engine = StaticInferenceEngine(ours, 2, 32, detokenize=lambda ids: "".join(f"<{i}>" for i in ids))
    stop = f"<{free[2]}><{free[3]}>"
    text = "".join(f"<{i}>" for i in free)
    by_string = engine.generate([InferenceRequest(prompt, _greedy(NEW, stop_strings=(stop,)))])[0]
    produced = "".join(f"<{i}>" for i in by_string.generated_tokens)
    assert by_string.finish_reason == "stop" and by_string.stop_string == stop
    assert produced.endswith(stop) and text.startswith(produced) and stop not in produced[: -len(stop)]


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(models):
    _, ours = models["llama"]
    engine = StaticInferenceEngine(ours, 4, 32)
    prompt = tokens(1, 4, seed=5)[0].tolist()

    def sample(seed, others=0):
        params = SamplingParams(temperature=1.5, top_k=50, top_p=0.95, num_tokens_to_generate=12, random_seed=seed)
        batch = [InferenceRequest(prompt, params)] + [InferenceRequest(prompt, SamplingParams(num_tokens_to_generate=3))] * others
        return engine.generate(batch)[0].generated_tokens

    assert sample(1) == sample(1) == sample(1, others=2)
    assert sample(1) != sample(2)


def test_requests_beyond_the_limits_are_refused(models):
    _, ours = models["gpt2"]
    engine = StaticInferenceEngine(ours, 2, 16)
    with pytest.raises(ValueError, match="exceed the maximum sequence length 16"):
        engine.generate([InferenceRequest([1] * 10, _greedy(7))])
    with pytest.raises(ValueError, match="max_batch_size 2"):
        engine.generate([InferenceRequest([1], _greedy(1))] * 3)
    with pytest.raises(ValueError, match="at least one token"):
        InferenceRequest([], _greedy(1))


def test_streaming_callback_and_cancellation(models):
    _, ours = models["llama"]
    engine = StaticInferenceEngine(ours, 2, 32)
    prompt = tokens(1, 4, seed=5)[0].tolist()
    seen = []
    requests = [InferenceRequest(prompt, _greedy(10)), InferenceRequest(prompt, _greedy(10))]
    # request 1 is given up once it has 3 tokens; request 0 runs to the end
    results = engine.generate(
        requests, on_token=lambda i, t: seen.append((i, t)), cancelled=lambda: [False, sum(i == 1 for i, _ in seen) >= 3]
    )
    assert [t for i, t in seen if i == 0] == results[0].generated_tokens and len(results[0].generated_tokens) == 10
    assert results[1].finish_reason == "cancelled" and results[1].generated_tokens == results[0].generated_tokens[:3]


@pytest.mark.parametrize("name", ["gpt2", "llama", "mistral"])
def test_fixed_shape_decoding_equals_the_sliced_cache(models, name):
    """The CUDA-graph form of the cache (whole cache read under a mask, offset in a tensor)
    computes the logits of the ordinary form, here eagerly on CPU; Mistral's window of 8
    is left behind from position 8 on (a mask counted from the cache's end, not from the
    query's position, would see the wrong keys)."""
    _, ours = models[name]
    context = StaticInferenceContext(2, 24, ours.config.window_size)
    assert_fixed_shape_decoding_matches(ours, tokens(2, 20, seed=4), context, 5, TOL)


def test_cuda_graph_refusals_name_the_moe_setting(models, monkeypatch):
    """MoE decode steps are captured only where dispatch never reads a size on the host."""
    from megatron.core.inference import cuda_graphs

    config = models["mixtral"][1].config
    cases = [
        (dict(moe_grouped_gemm=False), "--moe-grouped-gemm"),
        (dict(moe_grouped_gemm=True, moe_expert_capacity_factor=1.0), "--moe-pad-expert-input-to-capacity"),
        (dict(moe_grouped_gemm=True, moe_router_load_balancing_type="sinkhorn"), "sinkhorn"),
        (dict(moe_grouped_gemm=True, expert_model_parallel_size=2), "expert parallelism"),
    ]
    for overrides, named in cases:
        for key, value in overrides.items():
            monkeypatch.setattr(config, key, value)
        assert named in cuda_graphs._moe_capture_refusal(config, torch.bfloat16, (9, 0))
        monkeypatch.undo()
    for key, value in dict(moe_grouped_gemm=True, moe_expert_capacity_factor=1.0,
                           moe_pad_expert_input_to_capacity=True).items():
        monkeypatch.setattr(config, key, value)
    assert cuda_graphs._moe_capture_refusal(config, torch.bfloat16, (9, 0)) is None
    assert "bf16" in cuda_graphs._moe_capture_refusal(config, torch.float32, (9, 0))
    assert "bf16" in cuda_graphs._moe_capture_refusal(config, torch.bfloat16, (8, 0))


def test_reset_context_prefills_again_then_decodes_fixed_shapes(models):
    """A kept context (the engine reuses it with its CUDA graph): after ``reset`` the next
    batch prefills through the ordinary path and decodes through the same offset tensor."""
    _, ours = models["llama"]
    context = StaticInferenceContext(2, 20)
    offsets = []

    def same_offset_tensor(ctx):
        assert not ctx.fixed_shapes
        ctx.use_fixed_shapes(torch.device("cpu"))
        offsets.append(ctx.offset_tensor)
        assert offsets[-1] is offsets[0] and int(offsets[-1]) == 5

    for seed in (4, 5):
        context.reset()
        assert_fixed_shape_decoding_matches(ours, tokens(2, 16, seed=seed), context, 5, TOL, same_offset_tensor)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compile_decode", [False, True])
@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_cuda_graph_decoding_equals_eager_on_gpu(models, name, compile_decode):
    _, ours = models[name]
    model = ours.cuda()
    prompts = [tokens(1, n, seed=n)[0].tolist() for n in (3, 9, 6)]
    params = SamplingParams(top_k=1, num_tokens_to_generate=16, return_log_probs=True)
    requests = [InferenceRequest(p, params) for p in prompts]
    eager = StaticInferenceEngine(model, 4, 32).generate(requests)
    graphed_engine = StaticInferenceEngine(model, 4, 32, use_cuda_graphs=True, compile_decode=compile_decode)
    assert graphed_engine.use_cuda_graphs
    graphed_engine.generate(requests[::-1])  # the graph of this shape is kept and replayed below
    for got, expected in zip(graphed_engine.generate(requests), eager):
        assert got.generated_tokens == expected.generated_tokens
        torch.testing.assert_close(torch.tensor(got.generated_log_probs), torch.tensor(expected.generated_log_probs),
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="needs a Hopper (or newer) GPU: bf16 grouped GEMMs")
def test_cuda_graph_decoding_of_grouped_moe_equals_eager_on_gpu(models):
    """bf16 Mixtral with grouped GEMMs: the graph replays the same kernels as the eager step."""
    ours = megatron_model(models["mixtral"][0], config_overrides={"moe_grouped_gemm": True})[0]
    model = ours.to(device="cuda", dtype=torch.bfloat16)
    requests = [InferenceRequest(tokens(1, n, seed=n)[0].tolist(), SamplingParams(top_k=1, num_tokens_to_generate=16,
                                                                                  return_log_probs=True))
                for n in (3, 9, 6)]
    eager = StaticInferenceEngine(model, 4, 32).generate(requests)
    graphed_engine = StaticInferenceEngine(model, 4, 32, use_cuda_graphs=True)
    assert graphed_engine.use_cuda_graphs
    for got, expected in zip(graphed_engine.generate(requests), eager):
        assert got.generated_tokens == expected.generated_tokens
        torch.testing.assert_close(torch.tensor(got.generated_log_probs), torch.tensor(expected.generated_log_probs))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_seeded_sampling_on_gpu_is_the_same_eager_and_graphed(models):
    """Sampling runs on the device (one sort, one uniform per row): a seeded request gives the
    same tokens eagerly and under the decode graph, alone or beside other requests."""
    _, ours = models["llama"]
    model = ours.cuda()
    prompt = tokens(1, 4, seed=5)[0].tolist()

    def sample(engine, seed, others=0):
        params = SamplingParams(temperature=1.5, top_k=50, top_p=0.95, num_tokens_to_generate=12, random_seed=seed)
        other = SamplingParams(temperature=0.7, num_tokens_to_generate=5)
        batch = [InferenceRequest(prompt, params)] + [InferenceRequest(prompt, other)] * others
        return engine.generate(batch)[0].generated_tokens

    eager = StaticInferenceEngine(model, 4, 32)
    graphed = StaticInferenceEngine(model, 4, 32, use_cuda_graphs=True)
    assert graphed.use_cuda_graphs
    expected = sample(eager, 1)
    assert sample(eager, 1, others=2) == expected
    assert sample(graphed, 1) == sample(graphed, 1, others=3) == expected
    assert sample(graphed, 2) != expected
