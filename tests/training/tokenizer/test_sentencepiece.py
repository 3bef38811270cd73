"""SentencePiece-backed types: ids equal sentencepiece's own; HEAD specials; legacy added tokens."""

import pytest

spm = pytest.importorskip("sentencepiece")

from megatron.training.tokenizer.sentencepiece_tokenizer import (  # noqa: E402
    GPTSentencePieceTokenizer,
    Llama2Tokenizer,
    SentencePieceTokenizer,
)

CLASSES = [SentencePieceTokenizer, GPTSentencePieceTokenizer, Llama2Tokenizer]


def _model(assets):
    return str(assets / "tokenizers" / "sentencepiece" / "mistral-7b-v0.1.model")


@pytest.fixture(scope="module")
def reference(assets, corpus_docs):
    sp = spm.SentencePieceProcessor(model_file=_model(assets))
    return sp, [sp.encode(d) for d in corpus_docs]


@pytest.mark.parametrize("cls", CLASSES)
def test_ids_and_specials_match_sentencepiece(assets, corpus_docs, reference, cls):
    _, ref_ids = reference
    tok = cls(_model(assets))
    got = [tok.tokenize(d) for d in corpus_docs]
    mismatched = [i for i, (a, b) in enumerate(zip(got, ref_ids)) if a != b]
    assert not mismatched, f"first mismatch in document {mismatched[0]}"
    # HEAD: no tokens added, eod = eos, no BOS prepended (also for Llama2Tokenizer).
    assert tok.vocab_size == 32000
    assert (tok.unk, tok.bos, tok.eos, tok.eod, tok.pad) == (0, 1, 2, 2, -1)
    assert tok.cls is None and tok.sep is None and tok.mask is None
    assert tok.unique_identifiers["class"] == cls.__name__


def test_detokenize_matches_sentencepiece(assets, corpus_docs, reference):
    sp, ref_ids = reference
    tok = SentencePieceTokenizer(_model(assets))
    for ids in ref_ids[:50]:
        assert tok.detokenize(ids) == sp.decode(ids)
    assert tok.detokenize(tok.tokenize("Hello world")) == "Hello world"


def test_legacy_special_tokens(assets, reference):
    sp, _ = reference
    tok = SentencePieceTokenizer(_model(assets), legacy=True, special_tokens=["<s>", "[INST]", "<extra_id_0>"])
    # <s> is already a piece; the two unknown tokens get ids after the model's 32000 pieces.
    assert tok.additional_special_tokens_ids == [32000, 32001]  # <s> is the model's bos
    assert tok.vocab_size == 32002
    # Text between specials is encoded alone; the separator piece right after a special is dropped.
    expected = [1, 32000] + sp.encode("Hi there") + [32001]
    after = sp.encode(" who")
    assert after[0] == sp.piece_to_id("\u2581")
    assert tok.tokenize("<s>[INST]Hi there<extra_id_0>") == expected
    assert tok.tokenize("[INST] who") == [32000] + after[1:]
    assert tok.detokenize([32000] + sp.encode("Hi")) == "[INST] Hi"


def test_special_tokens_need_the_legacy_flag(assets):
    with pytest.raises(ValueError, match="--tokenizer-sentencepiece-legacy"):
        SentencePieceTokenizer(_model(assets), special_tokens=["[INST]"])
