"""HF export of multi-latent attention runs: the DeepSeek-V3 family, its config fields, and
the runs it cannot describe refused with the reason."""

import os
import sys

import pytest
import torch

from megatron.training.arguments import parse_args
from tests.tools.conftest import repo_root

sys.path.insert(0, os.path.join(repo_root(), "tools", "checkpoint"))

from hf_config import hf_config_from_args, hf_family  # noqa: E402
from workers import ConversionError  # noqa: E402

MLA = ("--num-layers 3 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --max-position-embeddings 16 "
       "--swiglu --normalization RMSNorm --norm-epsilon 1e-6 --position-embedding-type rope --disable-bias-linear "
       "--qk-layernorm --multi-latent-attention --kv-lora-rank 16 --qk-head-dim 8 --qk-pos-emb-head-dim 4 "
       "--v-head-dim 6 ")
MOE = ("--num-experts 8 --moe-ffn-hidden-size 16 --moe-router-topk 4 --moe-layer-freq [0,1,1] "
       "--moe-shared-expert-intermediate-size 32 --moe-router-score-function sigmoid --moe-router-enable-expert-bias "
       "--moe-router-num-groups 4 --moe-router-group-topk 2 --moe-router-topk-scaling-factor 2.5 ")


def _config(extra: str) -> dict:
    args = parse_args(args=(MLA + extra).split())
    assert hf_family(args) == "deepseek_v3"
    return hf_config_from_args(args, 128, torch.float32)


def test_moe_run_exports_deepseek_v3_fields():
    config = _config(MOE + "--q-lora-rank 12")
    assert config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert (config["q_lora_rank"], config["kv_lora_rank"], config["qk_nope_head_dim"], config["qk_rope_head_dim"],
            config["v_head_dim"]) == (12, 16, 8, 4, 6)
    assert (config["first_k_dense_replace"], config["n_routed_experts"], config["n_shared_experts"]) == (1, 8, 2)
    assert (config["n_group"], config["topk_group"], config["routed_scaling_factor"]) == (4, 2, 2.5)


def test_dense_run_has_only_dense_layers():
    config = _config("")
    assert config["first_k_dense_replace"] == 3 and config["q_lora_rank"] is None


@pytest.mark.parametrize("extra, match", [
    (MOE.replace("[0,1,1]", "[1,0,1]"), "dense layers must come first"),
    (MOE.replace("--moe-router-enable-expert-bias ", ""), "expert-bias"),
    (MOE.replace("--moe-router-topk 4", "--moe-router-topk 2"), "best 2 experts"),
    ("--norm-epsilon 1e-5", "--norm-epsilon 1e-6"),
])
def test_unfitting_runs_are_refused(extra, match):
    with pytest.raises(ConversionError, match=match):
        _config(extra)


def test_yarn_run_exports_rope_parameters():
    config = _config("--rotary-scaling-factor 40 --mscale 0.7 --mscale-all-dim 0.7 "
                     "--yarn-original-max-position-embeddings 8 --no-yarn-correction-range-round-to-int")
    assert config["rope_parameters"] == {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 8,
        "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False, "mscale": 0.7, "mscale_all_dim": 0.7,
    }
    assert _config("--rope-type rope")["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
