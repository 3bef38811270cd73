"""tools/checkpoint/convert.py --model-type Mamba: Hugging Face Mamba2ForCausalLM import and
export through a Megatron checkpoint are exact."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from tests.tools.conftest import repo_root

sys.path.insert(0, os.path.join(repo_root(), "tools", "checkpoint"))

import convert  # noqa: E402
from workers import ConversionError  # noqa: E402

pytest.importorskip("transformers")
pytest.importorskip("safetensors")


def _convert(*argv: str) -> str:
    return convert.main(["--model-type", "Mamba", *argv])


def test_hf_import_export_round_trip_is_exact(tmp_path):
    """HF files -> Megatron checkpoint -> HF files: the same tensors under the same names,
    and transformers loads the result with the original's logits."""
    import transformers
    from safetensors.torch import load_file

    torch.manual_seed(0)
    config = transformers.Mamba2Config(vocab_size=96, hidden_size=32, state_size=8, num_hidden_layers=2, num_heads=8,
                                       head_dim=8, n_groups=2, expand=2, chunk_size=128, tie_word_embeddings=False)
    original = transformers.Mamba2ForCausalLM(config).eval()
    original.save_pretrained(str(tmp_path / "hf"), safe_serialization=True)
    _convert("--loader", "hf", "--saver", "core", "--load-dir", str(tmp_path / "hf"), "--save-dir", str(tmp_path / "core"))
    _convert("--loader", "core", "--saver", "hf", "--load-dir", str(tmp_path / "core"), "--save-dir", str(tmp_path / "out"))
    before = load_file(str(tmp_path / "hf" / "model.safetensors"))
    after = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(before) == sorted(after)
    for key in before:
        assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), key
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, original(ids).logits, rtol=0, atol=0)


def _round_trip(tmp_path, original):
    from safetensors.torch import load_file

    original.save_pretrained(str(tmp_path / "hf"), safe_serialization=True)
    _convert("--loader", "hf", "--saver", "core", "--load-dir", str(tmp_path / "hf"), "--save-dir", str(tmp_path / "core"))
    _convert("--loader", "core", "--saver", "hf", "--load-dir", str(tmp_path / "core"), "--save-dir", str(tmp_path / "out"))
    before = load_file(str(tmp_path / "hf" / "model.safetensors"))
    after = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(before) == sorted(after)
    for key in before:
        assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), key
    return str(tmp_path / "out")


def test_nemotron_h_hybrid_round_trip_is_exact(tmp_path):
    """A hybrid (Mamba, MLP, attention layers) through NemotronHForCausalLM files and back."""
    import transformers

    torch.manual_seed(0)
    config = transformers.NemotronHConfig(
        vocab_size=96, hidden_size=32, layers_block_type=["linear_attention", "mlp", "full_attention",
                                                          "linear_attention"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48, max_position_embeddings=64,
        ssm_state_size=8, mamba_num_heads=8, mamba_head_dim=8, n_groups=2, tie_word_embeddings=False)
    original = transformers.NemotronHForCausalLM(config).eval()
    out = _round_trip(tmp_path, original)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.layers_block_type == config.layers_block_type
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, original(ids).logits, rtol=0, atol=0)


def test_unmappable_hybrid_refuses_export():
    from argparse import Namespace

    from family_mamba import mamba_core_to_hf

    args = Namespace(num_layers=4, hybrid_layer_pattern="M-*E", hybrid_attention_ratio=0.0, hybrid_mlp_ratio=0.0,
                     hybrid_override_pattern=None, normalization="RMSNorm", add_bias_linear=False,
                     untie_embeddings_and_output_weights=True, mamba_num_heads=None, hidden_size=32, mamba_head_dim=8)
    with pytest.raises(ConversionError, match="maps M, \\* and - layers only"):
        mamba_core_to_hf({}, args, None, torch.float32, 96)
