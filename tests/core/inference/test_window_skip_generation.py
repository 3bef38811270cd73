"""Cached decoding of a model that mixes sliding-window and full-attention layers
(--window-attn-skip-freq 2, gpt-oss's pattern) gives the logits of the full forward at every
step, past the window. A cache that trimmed keys to the window would change the
full-attention layers' logits by far more than the 1e-5 fp32 reordering room."""

import torch

from megatron.core import tensor_parallel
from megatron.core.inference import StaticInferenceContext
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.activations import quick_gelu
from megatron.core.transformer.sliding_window import cache_window_size
from tests.core.inference.fixed_shape_decoding import assert_fixed_shape_decoding_matches
from megatron.core.transformer.transformer_config import TransformerConfig

TOL = dict(atol=1e-5, rtol=1e-5)


def _model():
    tensor_parallel.model_parallel_cuda_manual_seed(11)
    config = TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48, normalization="RMSNorm",
        gated_linear_unit=True, activation_func=quick_gelu, glu_linear_offset=1.0, activation_func_clamp_value=7.0,
        hidden_dropout=0.0, attention_dropout=0.0, window_size=(3, 0), window_attn_skip_freq=2,
        softmax_type="learnable", init_method_std=0.2,
    )
    return GPTModel(config, vocab_size=64, max_sequence_length=32, position_embedding_type="rope").eval()


def test_cached_logits_equal_full_forward_with_mixed_windows():
    model = _model()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids, None, None)
        context = StaticInferenceContext(2, 16, cache_window_size(model.config))
        for start, end in [(0, 4)] + [(p, p + 1) for p in range(4, 16)]:
            positions = torch.arange(start, end).expand(2, -1)
            got = model(ids[:, start:end], positions, None, inference_context=context)
            context.increment(end - start)
            torch.testing.assert_close(got, full[:, start:end], **TOL)


def test_fixed_shape_decoding_with_mixed_windows():
    """The CUDA-graph form of the cache: each sliding layer masks to its own window from the
    queries' real positions, the full-attention layers see every key."""
    model = _model()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(5))
    context = StaticInferenceContext(2, 20, cache_window_size(model.config))
    assert_fixed_shape_decoding_matches(model, ids, context, 4, TOL)


def test_trimming_the_cache_would_be_caught():
    model = _model()
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids, None, None)
        context = StaticInferenceContext(1, 12, model.config.window_size)
        model(ids[:, :11], torch.arange(11)[None], None, inference_context=context)
        context.increment(11)
        got = model(ids[:, 11:], torch.tensor([[11]]), None, inference_context=context)
    assert (got - full[:, 11:]).abs().max() > 1e-3
