"""Tensor-parallel generation of a hybrid model (Mamba, attention, MLP layers; 2 ranks,
gloo) equals one process: each rank keeps the recurrent states of its own SSM heads and
groups, and the KV cache of its own attention heads.

Every layout builds the same full weights (the mixer draws its parameters whole and
slices them; the other layers use layout-independent per-layer seeds). Tokens must be
identical; log-probs agree to 1e-5 (TP only reorders fp32 sums: ~1e-7 relative).
"""

import torch

from megatron.core import parallel_state
from megatron.core.inference import InferenceRequest, SamplingParams, StaticInferenceEngine
from megatron.core.models.mamba import MambaModel
from megatron.core.ssm.mamba_config import MambaConfig
from megatron.core.transformer.init_rng import layout_independent_initialization
from megatron.core.transformer.transformer_config import TransformerConfig
from tests.multirank import run_on_ranks

SEED, VOCAB = 1234, 96


def _model(tp: int = 1) -> MambaModel:
    config = TransformerConfig(
        num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48,
        normalization="RMSNorm", add_bias_linear=False, tensor_model_parallel_size=tp, use_cpu_initialization=True,
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.1,
    )
    mamba = MambaConfig(mamba_state_dim=8, mamba_head_dim=8, mamba_num_groups=2, mamba_num_heads=8, chunk_size=4)
    torch.manual_seed(SEED)  # the mixer draws its full parameters from the CPU generator
    with layout_independent_initialization(SEED):
        return MambaModel(config, mamba, "M*-M", vocab_size=VOCAB, max_sequence_length=32,
                          position_embedding_type="rope").eval()


def _requests():
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (3, 7, 5)]
    greedy = SamplingParams(top_k=1, num_tokens_to_generate=10, return_log_probs=True)
    seeded = SamplingParams(temperature=1.3, top_p=0.9, num_tokens_to_generate=8, random_seed=11, return_log_probs=True)
    return [InferenceRequest(prompts[0], greedy), InferenceRequest(prompts[1], seeded),
            InferenceRequest(prompts[2], greedy)]


def _generate_on_ranks(rank, world_size):
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    return StaticInferenceEngine(_model(world_size), 4, 32).generate(_requests())


def test_tensor_parallel_hybrid_generation_equals_one_process():
    expected = StaticInferenceEngine(_model(), 4, 32).generate(_requests())
    for got in run_on_ranks(_generate_on_ranks, world_size=2, timeout=240):
        for g, e in zip(got, expected):
            assert g.generated_tokens == e.generated_tokens
            torch.testing.assert_close(torch.tensor(g.prompt_log_probs + g.generated_log_probs),
                                       torch.tensor(e.prompt_log_probs + e.generated_log_probs), atol=1e-5, rtol=1e-5)
