"""Continuous batching over the paged KV cache: requests that join a running batch, with
prompts prefilled in chunks, give what each request gives alone in the static engine.

Blocks of 4 positions so every sequence spans several blocks; a step budget of 5 tokens so
prompts of 6-9 tokens are prefilled in chunks next to other requests' decode tokens.
Tolerance as in test_static_engine: the same fp32 math in another order (~1e-6 on
log-probs); a wrong block, slot or position moves them by > 1e-2.
"""

import pytest
import torch

from megatron.core.inference import DynamicInferenceEngine, InferenceRequest, SamplingParams, StaticInferenceEngine
from tests.core.models.hf_cases import hf_model, megatron_model, tokens

TOL = dict(atol=1e-5, rtol=1e-5)


def _requests():
    greedy = dict(top_k=1, return_log_probs=True)
    return [
        InferenceRequest(tokens(1, 9, seed=1)[0].tolist(),
                         SamplingParams(num_tokens_to_generate=12, top_logprobs=3, **greedy)),
        InferenceRequest(tokens(1, 3, seed=2)[0].tolist(), SamplingParams(num_tokens_to_generate=7, **greedy)),
        InferenceRequest(tokens(1, 6, seed=3)[0].tolist(),
                         SamplingParams(temperature=1.2, top_k=40, num_tokens_to_generate=9, random_seed=5,
                                        return_log_probs=True)),
        InferenceRequest(tokens(1, 7, seed=4)[0].tolist(), SamplingParams(num_tokens_to_generate=0, return_log_probs=True)),
    ]


def _ids(top):
    return None if top is None else [[t for t, _ in position] for position in top]


def _assert_same(got, expected):
    assert got.generated_tokens == expected.generated_tokens
    assert _ids(got.prompt_top_log_probs) == _ids(expected.prompt_top_log_probs)
    assert _ids(got.generated_top_log_probs) == _ids(expected.generated_top_log_probs)
    torch.testing.assert_close(torch.tensor(got.prompt_log_probs + got.generated_log_probs),
                               torch.tensor(expected.prompt_log_probs + expected.generated_log_probs), **TOL)


@pytest.mark.parametrize("name", ["gpt2", "mistral"])
def test_requests_arriving_mid_stream_equal_each_alone(name):
    model, _, _ = megatron_model(hf_model(name))
    static = StaticInferenceEngine(model, 1, 32)
    alone = [static.generate([r])[0] for r in _requests()]
    engine = DynamicInferenceEngine(model, max_requests=3, num_blocks=24, block_size=4, max_tokens_per_step=5,
                                    max_sequence_length=32)
    first = engine.add_request(_requests()[0])
    results = {}
    for _ in range(3):  # request 0 is prefilled in chunks and starts decoding alone
        results.update(engine.step())
    later = [engine.add_request(r) for r in _requests()[1:]]
    joined_while_running = False
    while engine.has_unfinished_requests():
        joined_while_running |= first in engine.running and later[0] in engine.running
        results.update(engine.step())
    assert joined_while_running
    for request_id, expected in zip([first] + later, alone):
        _assert_same(results[request_id], expected)
    assert sorted(engine.context.free_blocks) == list(range(24))  # every block came back


def test_a_full_pool_makes_requests_wait_for_blocks():
    model, _, _ = megatron_model(hf_model("llama"))
    # 6 blocks of 4: one 20-token request at a time
    engine = DynamicInferenceEngine(model, max_requests=4, num_blocks=6, block_size=4, max_tokens_per_step=8,
                                    max_sequence_length=32)
    requests = [InferenceRequest(tokens(1, 8, seed=s)[0].tolist(), SamplingParams(top_k=1, num_tokens_to_generate=12))
                for s in (1, 2)]
    ids = [engine.add_request(r) for r in requests]
    engine.step()
    assert engine.running == [ids[0]] and list(engine.waiting) == [ids[1]]
    results = {}
    while engine.has_unfinished_requests():
        results.update(engine.step())
    static = StaticInferenceEngine(model, 1, 32)
    for request_id, request in zip(ids, requests):
        assert results[request_id].generated_tokens == static.generate([request])[0].generated_tokens
    with pytest.raises(ValueError, match="more KV blocks than the pool has"):
        engine.add_request(InferenceRequest([1] * 20, SamplingParams(num_tokens_to_generate=10)))


def test_cancel_and_abort_return_the_blocks():
    model, _, _ = megatron_model(hf_model("llama"))
    engine = DynamicInferenceEngine(model, max_requests=2, num_blocks=12, block_size=4, max_tokens_per_step=8,
                                    max_sequence_length=32)
    params = SamplingParams(top_k=1, num_tokens_to_generate=10)
    first, second, third = (engine.add_request(InferenceRequest([1, 2, 3], params)) for _ in range(3))
    engine.step()  # the first two run, the third waits for a slot
    engine.cancel(first)
    engine.cancel(third)  # never admitted
    finished = dict(engine.step())
    assert finished[first].finish_reason == "cancelled" and finished[third].finish_reason == "cancelled"
    assert len(finished[first].generated_tokens) == 1 and finished[third].generated_tokens == []
    assert engine.running == [second]
    engine.abort_all()
    assert not engine.has_unfinished_requests() and sorted(engine.context.free_blocks) == list(range(12))
