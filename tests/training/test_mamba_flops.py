"""The hybrid FLOP count: each layer kind by its formula, 3x for forward + backward."""

from argparse import Namespace

import pytest

from megatron.training.arguments import parse_and_validate
from megatron.training.flops import num_floating_point_operations
from tests.training.mamba_runs import hybrid_argv


def _args(pattern="M*-M", **kw):
    base = dict(is_hybrid_model=True, num_layers=len(pattern), hybrid_layer_pattern=pattern,
                hybrid_attention_ratio=0.0, hybrid_mlp_ratio=0.0, hybrid_override_pattern=None,
                seq_length=128, hidden_size=64, padded_vocab_size=512, ffn_hidden_size=256, swiglu=False,
                num_attention_heads=4, num_query_groups=2, group_query_attention=True, kv_channels=16,
                mamba_state_dim=16, mamba_head_dim=8, mamba_num_groups=2, mamba_num_heads=None,
                moe_ffn_hidden_size=None, moe_router_topk=2, moe_shared_expert_intermediate_size=None)
    base.update(kw)
    return Namespace(**base)


def test_each_layer_kind_adds_its_formula():
    s, h, b = 128, 64, 3
    only_logits = 3 * b * s * 2 * h * 512
    d_in, heads = 2 * h, 2 * h // 8
    mamba = 2 * h * (2 * d_in + 2 * 2 * 16 + heads) + 7 * d_in * 16 + 2 * d_in * h
    attention = 4 * h * 64 * (1 + 2 / 4) + 2 * s * 64
    mlp = 4 * h * 256
    expected = only_logits + 3 * b * s * (2 * mamba + attention + mlp)
    assert num_floating_point_operations(_args(), b) == pytest.approx(expected)
    # Adding a Mamba layer adds exactly one Mamba term.
    more = num_floating_point_operations(_args("MM*-M"), b) - num_floating_point_operations(_args(), b)
    assert more == pytest.approx(3 * b * s * mamba)


def test_older_ratio_flags_give_the_same_count_as_their_pattern():
    from megatron.core.models.mamba.layer_pattern import allocate_layers

    pattern = allocate_layers(8, 0.25, 0.25)
    by_ratio = _args(hybrid_layer_pattern=None, num_layers=8, hybrid_attention_ratio=0.25, hybrid_mlp_ratio=0.25)
    assert num_floating_point_operations(by_ratio, 2) == num_floating_point_operations(_args(pattern), 2)


def test_pretrain_hybrid_defaults_select_the_hybrid_count():
    import pretrain_hybrid

    args = parse_and_validate(hybrid_argv([]), defaults=pretrain_hybrid.HYBRID_DEFAULTS, world_size=1, rank=0)
    assert args.is_hybrid_model is True
    gpt_args = parse_and_validate(hybrid_argv([]), world_size=1, rank=0)
    assert not gpt_args.is_hybrid_model
    args.padded_vocab_size = gpt_args.padded_vocab_size = 512  # set by the tokenizer at run time
    assert num_floating_point_operations(args, 8) != num_floating_point_operations(gpt_args, 8)
