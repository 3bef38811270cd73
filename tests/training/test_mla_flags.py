"""Megatron's multi-latent attention flags: parsed with Megatron's defaults, translated
into the TransformerConfig, refused in the combinations Megatron (or this package) refuses,
and counted in the model FLOPs by Megatron's formula."""

from types import SimpleNamespace

import pytest

from megatron.training.arguments import parse_and_validate
from megatron.training.config_from_args import core_transformer_config_from_args
from megatron.training.flops import num_floating_point_operations

BASE = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
        "--max-position-embeddings 16 --micro-batch-size 2 --position-embedding-type rope").split()


def _config(extra=""):
    return core_transformer_config_from_args(parse_and_validate(BASE + extra.split(), world_size=1, rank=0))


def test_megatron_defaults_and_translation():
    args = parse_and_validate(BASE, world_size=1, rank=0)
    assert (args.multi_latent_attention, args.q_lora_rank, args.kv_lora_rank) == (False, None, 32)
    assert (args.qk_head_dim, args.qk_pos_emb_head_dim, args.v_head_dim) == (128, 64, 128)
    assert (args.rotary_scaling_factor, args.mscale, args.mscale_all_dim) == (1.0, 1.0, 0.0)
    config = _config("--multi-latent-attention --q-lora-rank 12 --kv-lora-rank 16 --qk-head-dim 8 "
                     "--qk-pos-emb-head-dim 4 --v-head-dim 6")
    assert config.multi_latent_attention and config.q_lora_rank == 12 and config.kv_lora_rank == 16
    assert (config.qk_head_dim, config.qk_pos_emb_head_dim, config.v_head_dim) == (8, 4, 6)


@pytest.mark.parametrize("extra, match", [
    ("--group-query-attention --num-query-groups 2", "grouped-query"),
    ("--rotary-scaling-factor 0.5", "--rotary-scaling-factor"),
    ("--kv-lora-rank 0", "--kv-lora-rank"),
])
def test_refusals_name_the_flag(extra, match):
    with pytest.raises(ValueError, match=match):
        _config("--multi-latent-attention " + extra)


def test_yarn_flags_reach_the_config_and_need_mla():
    config = _config("--multi-latent-attention --rope-type yarn --rotary-scaling-factor 40 --mscale 0.7 "
                     "--mscale-all-dim 0.7 --yarn-original-max-position-embeddings 8 --yarn-beta-fast 16 "
                     "--yarn-beta-slow 2 --no-yarn-correction-range-round-to-int")
    assert (config.rope_type, config.rotary_scaling_factor, config.mscale, config.mscale_all_dim) == ("yarn", 40, 0.7, 0.7)
    assert (config.yarn_original_max_position_embeddings, config.yarn_beta_fast, config.yarn_beta_slow) == (8, 16, 2)
    assert config.yarn_correction_range_round_to_int is False
    defaults = _config("--multi-latent-attention")
    assert defaults.rope_type is None and defaults.yarn_correction_range_round_to_int is True
    assert defaults.yarn_original_max_position_embeddings == 4096
    with pytest.raises(ValueError, match="--multi-latent-attention"):
        _config("--rope-type yarn")
    with pytest.raises(ValueError, match="--mla-down-proj-fusion"):
        parse_and_validate(BASE + "--multi-latent-attention --mla-down-proj-fusion".split(), world_size=1, rank=0)


def test_flops_match_a_hand_count():
    args = SimpleNamespace(
        seq_length=16, num_layers=2, hidden_size=32, padded_vocab_size=128, ffn_hidden_size=64,
        num_attention_heads=4, kv_channels=8, multi_latent_attention=True, q_lora_rank=12, kv_lora_rank=16,
        qk_head_dim=8, qk_pos_emb_head_dim=4, v_head_dim=6,
    )
    # per layer: q 12*(32+4*12+1)=972, kv 16*(32+4*14+1)+32*4=1552, out 4*6*32=768,
    # core 16*4*12/2 + 16*4*6/2 = 576 -> 3868; x 6 (fwd+bwd, multiply-add) x 2 layers = 46416
    # mlp 12*32*64*2 = 49152, logits 6*32*128 = 24576 -> 120144 per token, x 16 tokens
    assert num_floating_point_operations(args, batch_size=1) == 120144 * 16
    args.q_lora_rank = None  # q projected directly: h*n*(dq+dr) = 32*4*12 = 1536 instead of 972
    assert num_floating_point_operations(args, batch_size=1) == (120144 + 6 * 2 * (1536 - 972)) * 16
