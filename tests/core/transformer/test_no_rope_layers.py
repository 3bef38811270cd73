"""--no-rope-freq (Llama 4's layers without the rotary embedding): the flag's two forms,
its validation, and a GPT model whose marked layers attend without RoPE.

A model whose every layer is marked must equal the same weights without position
embeddings; one with no layer marked must equal plain RoPE; marking one layer must change
the logits (so the mark reaches the attention it names). fp32, same weights: 1e-6."""

import pytest
import torch

from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.sliding_window import skips_rope
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.training.arguments import parse_and_validate

TOL = dict(atol=1e-6, rtol=1e-6)
BASE = ("--num-layers 4 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
        "--max-position-embeddings 16 --micro-batch-size 2").split()


def _logits(no_rope_freq, position_embedding_type="rope"):
    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, hidden_dropout=0.0,
                               attention_dropout=0.0, use_cpu_initialization=True, no_rope_freq=no_rope_freq,
                               init_method_std=0.3)  # peaked attention: positions matter
    torch.manual_seed(0)
    model = GPTModel(config, vocab_size=64, max_sequence_length=12, position_embedding_type=position_embedding_type)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids, torch.arange(12).expand(2, -1), None)


def test_marked_layers_attend_without_rope():
    plain_rope, no_position = _logits(None), _logits(None, position_embedding_type="none")
    torch.testing.assert_close(_logits([0, 0]), plain_rope, **TOL)
    torch.testing.assert_close(_logits([1, 1]), no_position, **TOL)
    torch.testing.assert_close(_logits(1), no_position, **TOL)
    second_only = _logits(2)
    torch.testing.assert_close(second_only, _logits([0, 1]), **TOL)
    assert not torch.allclose(second_only, plain_rope, atol=1e-2)
    assert not torch.allclose(second_only, no_position, atol=1e-2)
    assert not torch.allclose(_logits([1, 0]), second_only, atol=1e-2)


def test_which_layers_skip():
    config = TransformerConfig(num_layers=8, hidden_size=8, num_attention_heads=2, no_rope_freq=4)
    assert [skips_rope(config, n) for n in range(1, 9)] == [False, False, False, True] * 2
    config = TransformerConfig(num_layers=3, hidden_size=8, num_attention_heads=2, no_rope_freq=[1, 0, 1])
    assert [skips_rope(config, n) for n in range(1, 4)] == [True, False, True]
    assert not skips_rope(TransformerConfig(num_layers=3, hidden_size=8, num_attention_heads=2), 3)


def test_flag_takes_an_integer_or_a_pattern():
    args = parse_and_validate(BASE + ["--position-embedding-type", "rope", "--no-rope-freq", "([0]*3+[1])*1"],
                              world_size=1, rank=0)
    assert args.no_rope_freq == [0, 0, 0, 1]
    args = parse_and_validate(BASE + ["--position-embedding-type", "rope", "--no-rope-freq", "2"], world_size=1, rank=0)
    assert args.no_rope_freq == 2


@pytest.mark.parametrize("extra, match", [
    (["--position-embedding-type", "rope", "--no-rope-freq", "3"], "positive divisor of --num-layers 4"),
    (["--position-embedding-type", "rope", "--no-rope-freq", "[0,1]"], "one 0 or 1 per layer"),
    (["--position-embedding-type", "rope", "--no-rope-freq", "[0,2,0,1]"], "one 0 or 1 per layer"),
    (["--position-embedding-type", "learned_absolute", "--no-rope-freq", "2"], "--position-embedding-type rope"),
])
def test_bad_values_name_the_flag(extra, match):
    from megatron.training.config_from_args import core_transformer_config_from_args

    with pytest.raises(ValueError, match=match):
        core_transformer_config_from_args(parse_and_validate(BASE + extra, world_size=1, rank=0))


def test_cached_decoding_equals_the_full_forward():
    from megatron.core.inference import StaticInferenceContext

    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, hidden_dropout=0.0,
                               attention_dropout=0.0, use_cpu_initialization=True, no_rope_freq=[0, 1],
                               init_method_std=0.3)
    torch.manual_seed(0)
    model = GPTModel(config, vocab_size=64, max_sequence_length=16, position_embedding_type="rope").eval()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids, None, None)
        context = StaticInferenceContext(2, 12)
        for start, end in [(0, 4)] + [(p, p + 1) for p in range(4, 12)]:
            got = model(ids[:, start:end], torch.arange(start, end).expand(2, -1), None, inference_context=context)
            context.increment(end - start)
            torch.testing.assert_close(got, full[:, start:end], atol=1e-5, rtol=1e-5)
