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
from hf_config import hf_config_from_args, hf_family  # noqa: E402
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


def test_sinks_without_the_gpt_oss_unit_are_refused_on_export():
    args = parse_args(args=("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
                            "--max-position-embeddings 16 --swiglu --normalization RMSNorm --disable-bias-linear "
                            "--position-embedding-type rope --num-experts 4 --softmax-type learnable").split())
    assert hf_family(args) == "mixtral"
    with pytest.raises(ConversionError, match="vanilla softmax"):
        hf_config_from_args(args, 64, torch.float32)


def test_convert_imports_and_exports_a_gpt_oss_checkpoint(tmp_path):
    """convert.py --loader hf on a saved tiny gpt-oss gives a checkpoint whose model has
    transformers' logits (1e-5, fp32; a wrong flag or mapping changes them by > 1e-3), and
    exporting it gives the same files back, which transformers loads."""
    from safetensors.torch import load_file
    import convert
    from core_checkpoint import open_core_checkpoint, worker_args
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig
    from tests.core.models.hf_cases import tokens
    from workers import export_state_dict, run_workers

    transformers = pytest.importorskip("transformers")
    config = transformers.GptOssConfig(**{**_hf_config(), "vocab_size": 128, "max_position_embeddings": 32})
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for param in hf.parameters():
            param.normal_(0.0, 0.2) if param.dim() > 1 else param.add_(0.1 * torch.randn_like(param))
    hf.save_pretrained(str(tmp_path / "hf"), safe_serialization=True)
    convert.main(["--model-type", "GPT", "--loader", "hf", "--load-dir", str(tmp_path / "hf"),
                  "--save-dir", str(tmp_path / "core"), "--saver-ckpt-format", "torch"])
    checkpoint = open_core_checkpoint(str(tmp_path / "core"))
    args = worker_args(checkpoint.args, load=checkpoint.root, save=None, ckpt_format="torch", tp=1, pp=1, ep=1)
    out = str(tmp_path / "state.pt")
    run_workers(export_state_dict, 1, args, {"model_provider": "pretrain_gpt:model_provider", "output": out})
    _, config_kwargs, model_kwargs = gpt_kwargs_from_hf_config(hf.config.to_dict())
    model = GPTModel(TransformerConfig(use_cpu_initialization=True, **config_kwargs), **model_kwargs).eval()
    model.load_state_dict(torch.load(out)["model"], strict=True)
    ids = tokens()
    with torch.no_grad():
        ours = model(ids, torch.arange(ids.size(1)).expand_as(ids), None)
        torch.testing.assert_close(ours, hf(ids).logits, atol=1e-5, rtol=1e-5)
    convert.main(["--model-type", "GPT", "--loader", "core", "--saver", "hf", "--load-dir", str(tmp_path / "core"),
                  "--save-dir", str(tmp_path / "out")])
    before = load_file(str(tmp_path / "hf" / "model.safetensors"))
    after = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(before) == sorted(after)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), attn_implementation="eager")
    assert reloaded.config.layer_types == hf.config.layer_types
    with torch.no_grad():
        torch.testing.assert_close(reloaded.float().eval()(ids).logits, hf(ids).logits, rtol=0, atol=0)
