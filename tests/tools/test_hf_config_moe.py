"""HF export family of MoE runs: the gated shared expert picks qwen2_moe, and families
without a shared expert refuse one instead of silently dropping it; the HF config of a
Qwen2-MoE model maps back to the shared-expert flags."""

import os
import sys

import pytest
import torch

from megatron.training.arguments import parse_args
from tests.tools.conftest import repo_root

sys.path.insert(0, os.path.join(repo_root(), "tools", "checkpoint"))

from hf_args import model_flags_from_hf_config  # noqa: E402
from hf_config import hf_config_from_args, hf_family  # noqa: E402
from workers import ConversionError  # noqa: E402

MOE = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --max-position-embeddings 16 "
       "--swiglu --normalization RMSNorm --position-embedding-type rope --disable-bias-linear "
       "--untie-embeddings-and-output-weights --num-experts 4 --moe-ffn-hidden-size 24 --kv-channels 8 ")


def _args(extra: str):
    return parse_args(args=(MOE + extra).split())


def test_gated_shared_expert_exports_as_qwen2_moe():
    args = _args("--add-qkv-bias --moe-shared-expert-intermediate-size 40 --moe-shared-expert-gate")
    assert hf_family(args) == "qwen2_moe"
    config = hf_config_from_args(args, 128, torch.float32)
    assert config["architectures"] == ["Qwen2MoeForCausalLM"]
    assert config["shared_expert_intermediate_size"] == 40 and config["qkv_bias"] is True


@pytest.mark.parametrize("extra, family", [
    ("--moe-shared-expert-intermediate-size 40", "mixtral"),
    ("--moe-shared-expert-intermediate-size 40 --qk-layernorm", "qwen3_moe"),
])
def test_ungated_shared_expert_is_refused(extra, family):
    args = _args(extra)
    assert hf_family(args) == family
    with pytest.raises(ConversionError, match=f"does not fit the Hugging Face {family} family"):
        hf_config_from_args(args, 128, torch.float32)


def test_qwen2_moe_config_gives_the_shared_expert_flags():
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2MoeConfig(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, vocab_size=64,
        intermediate_size=64, moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=4,
        num_experts_per_tok=2,
    )
    flags = model_flags_from_hf_config(config.to_dict())
    joined = " ".join(flags)
    assert "--moe-shared-expert-intermediate-size 40" in joined and "--moe-shared-expert-gate" in flags
    assert "--add-qkv-bias" in flags and "--moe-router-pre-softmax" in flags
