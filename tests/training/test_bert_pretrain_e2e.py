"""End to end on CPU, as a user would: preprocess a slice of a real corpus with
--split-sentences and the bert-base-uncased vocabulary, pretrain a tiny BERT on it with
evaluation, and see both losses logged and the masked-LM loss fall. Skips cleanly when the
shared assets (corpora, vocabulary, punkt data) are absent."""

from __future__ import annotations

import pytest

from tests.tools.conftest import BERT_VOCAB, KJV, NLTK_DATA
from tests.training.bert_runs import LM_LOSS, SOP_LOSS, run_bert, values


@pytest.fixture
def kjv_bert_prefix(tmp_path, monkeypatch):
    if not (KJV.exists() and BERT_VOCAB.exists() and NLTK_DATA.exists()):
        pytest.skip("shared assets (KJV corpus, bert-base-uncased vocab, nltk punkt data) not found")
    pytest.importorskip("nltk")
    monkeypatch.setenv("NLTK_DATA", str(NLTK_DATA))
    from tools import preprocess_data

    source = tmp_path / "kjv12.jsonl"
    with open(KJV, "rb") as src:
        source.write_bytes(b"".join(src.readline() for _ in range(12)))
    rc = preprocess_data.main(["--input", str(source), "--output-prefix", str(tmp_path / "kjv"),
                               "--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file", str(BERT_VOCAB),
                               "--split-sentences", "--workers", "1"])
    assert rc == 0
    return str(tmp_path / "kjv_text_sentence")


def test_pretrain_bert_on_a_preprocessed_corpus(kjv_bert_prefix, tmp_path):
    argv = [
        "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "64", "--max-position-embeddings", "64",
        "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", "12",
        "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "2",
        "--data-path", kjv_bert_prefix, "--split", "90,8,2", "--data-cache-path", str(tmp_path / "cache"),
        "--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file", str(BERT_VOCAB),
        "--log-interval", "1", "--eval-interval", "6", "--eval-iters", "2",
        "--use-cpu-initialization", "--num-workers", "0", "--distributed-backend", "gloo",
    ]
    log, _ = run_bert(1, argv)
    lm, sop = values(LM_LOSS, log), values(SOP_LOSS, log)
    # 12 training lines, then two validation reports (iterations 6 and 12) and the final test report
    assert len(lm) >= 12 and len(sop) == len(lm)
    assert sum(lm[9:12]) / 3 < sum(lm[:3]) / 3 - 1.0, lm
    assert "validation loss at iteration 6" in log and "lm loss value" in log and "sop loss value" in log
    assert any(name.endswith("BERTMaskedWordPieceDataset-sample_index.npy") for name in
               __import__("os").listdir(tmp_path / "cache"))
