"""An HF gpt-oss config gives the flags of the same model: the command line builds the
TransformerConfig that the exact weight mapping expects; the export side refuses a run
with attention sinks (no HF family here writes gpt-oss configs yet)."""

import os
import sys

import pytest
import torch

from megatron.core.models.gpt.hf_mapping import gpt_kwargs_from_hf_config
from megatron.training.arguments import parse_and_validate, parse_args
from megatron.training.config_from_args import core_transformer_config_from_args
from tests.tools.conftest import repo_root

sys.path.insert(0, os.path.join(repo_root(), "tools", "checkpoint"))

from hf_args import model_flags_from_hf_config, tokenizer_flags_from_hf_config  # noqa: E402
from hf_config import hf_config_from_args  # noqa: E402
from workers import ConversionError  # noqa: E402


def _hf_config():
    transformers = pytest.importorskip("transformers")
    return transformers.GptOssConfig(
        num_hidden_layers=4, hidden_size=32, intermediate_size=24, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, vocab_size=64, max_position_embeddings=16, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=8, rope_parameters={"rope_type": "default", "rope_theta": 150000.0},
    ).to_dict()


def test_flags_build_the_mapped_config():
    hf = _hf_config()
    flags = model_flags_from_hf_config(hf) + tokenizer_flags_from_hf_config(hf) + ["--micro-batch-size", "1"]
    config = core_transformer_config_from_args(parse_and_validate(flags))
    _, expected, _ = gpt_kwargs_from_hf_config(hf)
    for name, value in expected.items():
        assert getattr(config, name) == value, name
    assert config.window_attn_skip_freq == [1, 0, 1, 0]


def test_yarn_rope_is_refused():
    hf = _hf_config()
    hf["rope_parameters"] = {"rope_type": "yarn", "factor": 32.0, "rope_theta": 150000.0}
    with pytest.raises(ValueError, match="rope_type 'yarn' does not convert"):
        gpt_kwargs_from_hf_config(hf)


def test_export_of_a_run_with_sinks_is_refused():
    args = parse_args(args=("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
                            "--max-position-embeddings 16 --quick-geglu --normalization RMSNorm "
                            "--position-embedding-type rope --num-experts 4 --softmax-type learnable").split())
    with pytest.raises(ConversionError, match="vanilla softmax"):
        hf_config_from_args(args, 64, torch.float32)
