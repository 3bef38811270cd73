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


def test_hybrid_pattern_refuses_mamba2_export():
    from argparse import Namespace

    from family_mamba import mamba_core_to_hf

    args = Namespace(num_layers=4, hybrid_layer_pattern="M-*M", hybrid_attention_ratio=0.0, hybrid_mlp_ratio=0.0,
                     hybrid_override_pattern=None)
    with pytest.raises(ConversionError, match="only Mamba-only models export"):
        mamba_core_to_hf({}, args, None, torch.float32, 96)
