"""Mamba/hybrid generation on a GPU (Triton conv1d and the compiled SSD scan in the
prefill and chunked-prefill runs, the plain-torch step in decoding) gives the full
forward's logits at every step, fp32; the static and dynamic engines agree, and decoding
from a CUDA graph equals eager decoding.

Tolerance: TF32 is off, so both sides do fp32 math in another order (~1e-6 relative);
1e-4 as in tests/core/models/test_mamba_gpu.py, far below a wrong state (> 1e-3)."""

import pytest
import torch

from megatron.core.inference import (
    DynamicInferenceEngine,
    InferenceRequest,
    SamplingParams,
    StaticInferenceContext,
    StaticInferenceEngine,
)
from tests.core.models import test_mamba_nemotron_h_parity as nemotron_case

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def model():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return nemotron_case._ours(nemotron_case.hf.__wrapped__()).cuda()


def test_cached_logits_equal_full_forward_on_gpu(model):
    ids = torch.randint(0, nemotron_case.VOCAB, (2, 24), generator=torch.Generator().manual_seed(3)).cuda()
    with torch.no_grad():
        full = model(ids, None, None)
        context = StaticInferenceContext(2, 24)
        for start, end in [(0, 5), (5, 12)] + [(p, p + 1) for p in range(12, 24)]:
            positions = torch.arange(start, end, device="cuda").expand(2, -1)
            got = model(ids[:, start:end], positions, None, inference_context=context)
            context.increment(end - start)
            torch.testing.assert_close(got, full[:, start:end], **TOL)


def _requests():
    gen = torch.Generator().manual_seed(5)
    params = SamplingParams(top_k=1, num_tokens_to_generate=12, return_log_probs=True)
    return [InferenceRequest(torch.randint(0, nemotron_case.VOCAB, (n,), generator=gen).tolist(), params)
            for n in (3, 9, 6)]


def _assert_same(got, expected):
    for one, want in zip(got, expected):
        assert one.generated_tokens == want.generated_tokens
        torch.testing.assert_close(torch.tensor(one.generated_log_probs), torch.tensor(want.generated_log_probs), **TOL)
        torch.testing.assert_close(torch.tensor(one.prompt_log_probs), torch.tensor(want.prompt_log_probs), **TOL)


@pytest.mark.parametrize("compile_decode", [False, True])
def test_cuda_graph_decoding_equals_eager_on_gpu(model, compile_decode):
    """The graph's warm-up runs must not advance the recurrent states: a state advanced
    twice more would change every later token's log-prob."""
    requests = _requests()
    expected = StaticInferenceEngine(model, 4, 32).generate(requests)
    graphed = StaticInferenceEngine(model, 4, 32, use_cuda_graphs=True, compile_decode=compile_decode)
    assert graphed.use_cuda_graphs
    _assert_same(graphed.generate(requests), expected)
    _assert_same(graphed.generate(requests), expected)  # reuses the graph: states written in place


def test_static_and_dynamic_engines_agree_on_gpu(model):
    requests = _requests()
    expected = StaticInferenceEngine(model, 4, 32).generate(requests)
    dynamic = DynamicInferenceEngine(model, max_requests=3, num_blocks=24, block_size=4, max_tokens_per_step=5,
                                     max_sequence_length=32)
    _assert_same(dynamic.generate(requests), expected)
