"""tools/checkpoint/convert.py --model-type BERT: Hugging Face BERT import/export (exact),
the headless BertModel export, tokenizer files, resharding, and clear refusals."""

from __future__ import annotations

import json
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
    return convert.main(["--model-type", "BERT", *argv])


def _save_hf(arch: str, directory, seed: int = 0):
    from tests.core.models.bert_cases import hf_model

    model = hf_model(arch, seed=seed)
    model.save_pretrained(str(directory), safe_serialization=True)
    return model


def _import(hf_dir, core_dir, *more):
    _convert("--loader", "hf", "--saver", "core", "--load-dir", str(hf_dir), "--save-dir", str(core_dir), *more)


def _export(core_dir, hf_dir, *more):
    _convert("--loader", "core", "--saver", "hf", "--load-dir", str(core_dir), "--save-dir", str(hf_dir), *more)


def _same_files(a, b):
    from safetensors.torch import load_file

    before, after = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert sorted(before) == sorted(after)
    for key in before:
        assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), key


@pytest.mark.parametrize("arch", ["BertForPreTraining", "BertForMaskedLM"])
def test_hf_import_export_round_trip_is_exact(tmp_path, arch):
    """HF files -> ours (TP2, torch_dist) -> HF files: the same tensors under the same names,
    and transformers loads the result with the original's outputs."""
    import transformers
    from tests.core.models.bert_cases import batch

    original = _save_hf(arch, tmp_path / "hf")
    _import(tmp_path / "hf", tmp_path / "core", "--target-tensor-parallel-size", "2")
    _export(tmp_path / "core", tmp_path / "out")
    _same_files(tmp_path / "hf", tmp_path / "out")
    reloaded = getattr(transformers, arch).from_pretrained(str(tmp_path / "out")).float().eval()
    ids, types, mask = batch()
    with torch.no_grad():
        got = reloaded(input_ids=ids, token_type_ids=types, attention_mask=mask)
        want = original(input_ids=ids, token_type_ids=types, attention_mask=mask)
    key = "prediction_logits" if arch == "BertForPreTraining" else "logits"
    torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)


def test_export_as_headless_bert_model_gives_hidden_states_and_pooled_output(tmp_path):
    import transformers
    from tests.core.models.bert_cases import batch

    original = _save_hf("BertForPreTraining", tmp_path / "hf")
    _import(tmp_path / "hf", tmp_path / "core")
    _export(tmp_path / "core", tmp_path / "out", "--hf-model-type", "BertModel")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["BertModel"]
    bare = transformers.BertModel.from_pretrained(str(tmp_path / "out")).float().eval()
    ids, types, mask = batch()
    with torch.no_grad():
        got = bare(input_ids=ids, token_type_ids=types, attention_mask=mask)
        want = original.bert(input_ids=ids, token_type_ids=types, attention_mask=mask)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=0, atol=0)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, rtol=0, atol=0)


def test_headless_bert_model_round_trip_is_exact_and_keeps_its_heads_absent(tmp_path):
    """A headless BertModel imports (encoder and pooler; the converter rebuilds that model
    to reshard and export it), exports as itself, and cannot claim an LM head it lacks."""
    _save_hf("BertModel", tmp_path / "bare")
    _import(tmp_path / "bare", tmp_path / "core_bare", "--target-tensor-parallel-size", "2")
    _export(tmp_path / "core_bare", tmp_path / "out")
    _same_files(tmp_path / "bare", tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["BertModel"]
    with pytest.raises(ConversionError, match="needs the LM head"):
        _export(tmp_path / "core_bare", tmp_path / "mlm", "--hf-model-type", "BertForMaskedLM")


def test_refusals_name_the_problem(tmp_path):
    _save_hf("BertForMaskedLM", tmp_path / "mlm")
    _import(tmp_path / "mlm", tmp_path / "core_mlm")
    with pytest.raises(ConversionError, match="needs the pooler"):
        _export(tmp_path / "core_mlm", tmp_path / "out", "--hf-model-type", "BertForPreTraining")


def test_tokenizer_files_are_written(tmp_path):
    from argparse import Namespace

    from bert_family import write_bert_tokenizer

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\n")
    out = tmp_path / "out"
    out.mkdir()
    write_bert_tokenizer(str(out), Namespace(tokenizer_type="BertWordPieceCase", vocab_file=str(vocab),
                                             max_position_embeddings=16))
    assert (out / "vocab.txt").read_text() == vocab.read_text()
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["do_lower_case"] is False and config["tokenizer_class"] == "BertTokenizer"
