"""Tensor- and pipeline-parallel generation (2 ranks, gloo) equals one process, with
Megatron's rank roles: rank 0 runs the requests through the service and broadcasts each
batch; rank 1 follows until rank 0 says exit.

Every layout builds the same full weights (use_cpu_initialization with
layout-independent per-layer seeds); ranks keep their shards or stages. Tokens must be
identical; log-probs agree to 1e-5 (TP only reorders fp32 sums: ~1e-7 relative).
"""

import torch
import torch.nn.functional as F

from megatron.core import parallel_state
from megatron.core.inference import InferenceRequest, SamplingParams, StaticInferenceEngine
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.init_rng import layout_independent_initialization
from megatron.core.transformer.transformer_config import TransformerConfig
from tests.multirank import run_on_ranks

SEED, VOCAB = 1234, 128


def _model(tp: int = 1, pp: int = 1, pp_rank: int = 0) -> GPTModel:
    config = TransformerConfig(
        num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        add_qkv_bias=True, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.1,
        window_size=(5, 0),
    )
    with layout_independent_initialization(SEED):
        return GPTModel(config, vocab_size=VOCAB, max_sequence_length=32, position_embedding_type="rope",
                        share_embeddings_and_output_weights=False, pre_process=pp_rank == 0,
                        post_process=pp_rank == pp - 1).eval()


def _requests():
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (3, 7, 5)]
    greedy = SamplingParams(top_k=1, num_tokens_to_generate=10, return_log_probs=True, top_logprobs=2)
    seeded = SamplingParams(temperature=1.3, top_p=0.9, num_tokens_to_generate=8, random_seed=11, return_log_probs=True)
    return [InferenceRequest(prompts[0], greedy), InferenceRequest(prompts[1], seeded),
            InferenceRequest(prompts[2], greedy)]


def _serve_on_ranks(rank, world_size, tp, pp):
    from megatron.inference.rank_roles import Leader, follow
    from megatron.inference.text_service import ServingLimits, TextGenerationService

    groups = parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    engine = StaticInferenceEngine(_model(tp, pp, groups.rank("pp")), 2, 32)
    if rank != 0:
        follow(engine)
        return None
    service = TextGenerationService(engine, None, ServingLimits(), leader=Leader())
    try:
        # three requests on a batch of two: two announced batches, then a second request
        return service.generate(_requests()) + service.generate(_requests()[:1])
    finally:
        service.leader.shutdown()


def _check(tp: int, pp: int):
    expected_engine = StaticInferenceEngine(_model(), 2, 32)
    expected = expected_engine.generate(_requests()[:2]) + expected_engine.generate(_requests()[2:3])
    expected += expected_engine.generate(_requests()[:1])
    got = run_on_ranks(_serve_on_ranks, world_size=2, args=(tp, pp), timeout=240)[0]
    assert len(got) == 4
    for g, e in zip(got, expected):
        assert g.generated_tokens == e.generated_tokens
        for got_top, want_top in ((g.prompt_top_log_probs, e.prompt_top_log_probs),
                                  (g.generated_top_log_probs, e.generated_top_log_probs)):
            assert (got_top is None) == (want_top is None)
            if want_top is not None:  # the alternatives: the same tokens, log-probs to 1e-5
                assert [[t for t, _ in p] for p in got_top] == [[t for t, _ in p] for p in want_top]
                torch.testing.assert_close(torch.tensor([[v for _, v in p] for p in got_top]),
                                           torch.tensor([[v for _, v in p] for p in want_top]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.tensor(g.prompt_log_probs + g.generated_log_probs),
                                   torch.tensor(e.prompt_log_probs + e.generated_log_probs), atol=1e-5, rtol=1e-5)


def test_tensor_parallel_generation_equals_one_process():
    _check(tp=2, pp=1)


def test_pipeline_parallel_generation_equals_one_process():
    _check(tp=1, pp=2)
