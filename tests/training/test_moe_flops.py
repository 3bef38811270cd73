"""MoE FLOPs: MoE layers count top-k experts of --moe-ffn-hidden-size plus the shared
expert in place of the dense MLP, per --moe-layer-freq (megatron-facts 7.3)."""

from argparse import Namespace

import pytest

from megatron.training.flops import num_floating_point_operations


def _args(**moe):
    base = dict(seq_length=128, num_layers=4, hidden_size=64, padded_vocab_size=512, ffn_hidden_size=256,
                num_attention_heads=4, num_query_groups=4, group_query_attention=False, kv_channels=16,
                swiglu=True, num_experts=None)
    base.update(moe)
    return Namespace(**base)


def test_dense_args_unchanged_by_moe_code():
    dense = num_floating_point_operations(_args(), 8)
    # 12 L h f gated, by hand: the MLP share of the dense formula
    mlp = 12 * 4 * 64 * 256 * 1.5 * 8 * 128
    no_mlp = num_floating_point_operations(_args(ffn_hidden_size=0), 8)
    assert dense - no_mlp == pytest.approx(mlp)


def test_moe_layers_count_topk_experts_and_shared_expert():
    args = _args(num_experts=8, moe_router_topk=2, moe_ffn_hidden_size=96, moe_layer_freq=2,
                 moe_shared_expert_intermediate_size=32)
    # layers 0 and 2 are MoE: width 96*2 + 32 = 224; layers 1 and 3 dense: 256
    width = 2 * 256 + 2 * (96 * 2 + 32)
    no_mlp = num_floating_point_operations(_args(ffn_hidden_size=0), 8)
    expected = 12 * 64 * 1.5 * width * 8 * 128
    assert num_floating_point_operations(args, 8) - no_mlp == pytest.approx(expected)
