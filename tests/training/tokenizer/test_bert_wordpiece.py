"""BertWordPieceLowerCase / BertWordPieceCase: both backends give transformers' BertTokenizer ids."""

import pytest

from megatron.training.tokenizer.bert_wordpiece import BertWordPieceTokenizer, normalize_bert, pre_split

BACKENDS = ["rust", "python", "auto"]
EXTRA = [f"<extra_id_{i}>" for i in range(100)]


def _vocab(assets):
    return str(assets / "tokenizers" / "bert-base-uncased" / "vocab.txt")


def _make(assets, backend, **kw):
    if backend in ("rust", "auto"):
        pytest.importorskip("tokenizers")
    return BertWordPieceTokenizer(_vocab(assets), backend=backend, **kw)


@pytest.fixture(scope="module")
def hf_ids(assets, corpus_docs):
    """transformers' BertTokenizer ids (no [CLS]/[SEP]) for lower_case True and False."""
    transformers = pytest.importorskip("transformers")
    out = {}
    for lower in (True, False):
        ref = transformers.BertTokenizer(vocab=_vocab(assets), do_lower_case=lower)
        assert len(ref) == 30522
        out[lower] = ref(corpus_docs, add_special_tokens=False)["input_ids"]
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lower", [True, False])
def test_ids_match_transformers_on_corpora(assets, corpus_docs, hf_ids, backend, lower):
    tok = _make(assets, backend, lower_case=lower)
    got = [tok.tokenize(d) for d in corpus_docs]
    mismatched = [i for i, (a, b) in enumerate(zip(got, hf_ids[lower])) if a != b]
    assert not mismatched, f"{backend} lower={lower}: first mismatch in document {mismatched[0]}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_special_ids_and_reference_words(assets, backend):
    tok = _make(assets, backend, lower_case=True)
    assert tok.vocab_size == 30522
    assert (tok.pad, tok.unk, tok.cls, tok.sep, tok.mask) == (0, 100, 101, 102, 103)
    # Megatron HEAD (HF wrapper): bos falls back to [CLS], eos and eod to [SEP].
    assert (tok.bos, tok.eos, tok.eod) == (101, 102, 102)
    assert tok.tokenize("Hello, WORLD") == [7592, 1010, 2088]
    assert tok.tokenize("[SEP]") == [102]  # special tokens in the text keep their ids
    assert tok.additional_special_tokens_ids == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_extra_ids_match_transformers(assets, backend):
    transformers = pytest.importorskip("transformers")
    ref = transformers.BertTokenizer(vocab=_vocab(assets), do_lower_case=False)
    ref.add_special_tokens({"additional_special_tokens": EXTRA})
    tok = _make(assets, backend, lower_case=False, extra_tokens=EXTRA)
    assert tok.vocab_size == len(ref) == 30622
    assert tok.additional_special_tokens_ids == list(range(30522, 30622))
    text = "a <extra_id_5>b<extra_id_99> [SEP] <extra_id_10>"
    assert tok.tokenize(text) == ref.encode(text, add_special_tokens=False)


def test_normalization_pieces():
    assert normalize_bert("Héllo\tWörld\x07", lower_case=True) == "hello world"
    assert normalize_bert("Héllo", lower_case=False) == "Héllo"
    assert normalize_bert("ab中c", lower_case=False) == "ab 中 c"
    assert pre_split("don't stop...now") == ["don", "'", "t", "stop", ".", ".", ".", "now"]


def test_detokenize_joins_pieces(assets):
    tok = _make(assets, "python", lower_case=True)
    assert tok.detokenize(tok.tokenize("Tokenization works")) == "tokenization works"


def test_vocab_without_bert_specials_is_rejected(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("a\nb\n[UNK]\n")
    with pytest.raises(ValueError, match=r"--vocab-file .*lacks the BERT special tokens"):
        BertWordPieceTokenizer(str(vocab))
