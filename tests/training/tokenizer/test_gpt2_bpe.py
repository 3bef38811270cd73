"""GPT2BPETokenizer: every backend gives Hugging Face's GPT-2 ids and decodes losslessly."""

import pytest

from megatron.training.tokenizer.gpt2_bpe import GPT2BPETokenizer, bytes_to_unicode, load_gpt2_files, tiktoken_ranks

BACKENDS = ["tiktoken", "rust", "python"]


def _files(assets):
    d = assets / "tokenizers" / "gpt2"
    return str(d / "vocab.json"), str(d / "merges.txt")


@pytest.fixture(scope="module")
def reference_ids(assets, corpus_docs):
    transformers = pytest.importorskip("transformers")
    vocab, merges = _files(assets)
    ref = transformers.GPT2Tokenizer(vocab=vocab, merges=merges)
    assert len(ref) == 50257, "transformers did not load the files (5.x ignores vocab_file=)"
    return ref(corpus_docs, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def by_backend(assets):
    """One tokenizer per backend, built once (the Rust BPE takes a second to build)."""
    return {backend: _make(assets, backend) for backend in BACKENDS}


def _make(assets, backend, **kw):
    if backend == "tiktoken":
        pytest.importorskip("tiktoken")
    if backend == "rust":
        pytest.importorskip("tokenizers")
    return GPT2BPETokenizer(*_files(assets), backend=backend, **kw)


def test_bytes_to_unicode_is_a_printable_bijection():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert all(not c.isspace() and c.isprintable() for c in table.values())
    assert table[ord("A")] == "A" and table[ord(" ")] == "\u0120"  # GPT-2's "Ġ"


@pytest.mark.parametrize("backend", BACKENDS)
def test_ids_match_huggingface_on_corpora(by_backend, corpus_docs, reference_ids, backend):
    tok = by_backend[backend]
    assert tok.backend == backend
    got = [tok.tokenize(d) for d in corpus_docs]
    mismatched = [i for i, (a, b) in enumerate(zip(got, reference_ids)) if a != b]
    assert not mismatched, f"{backend}: first mismatch in document {mismatched[0]}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_sentence_special_ids_and_roundtrip(by_backend, backend):
    tok = by_backend[backend]
    assert tok.tokenize("Hello world, this is a test.") == [15496, 995, 11, 428, 318, 257, 1332, 13]
    assert tok.vocab_size == 50257
    assert tok.eod == tok.eos == tok.bos == 50256
    assert tok.pad == -1 and tok.cls is None and tok.sep is None and tok.mask is None
    # A literal <|endoftext|> is the end-of-document token (Megatron HEAD uses HF's GPT-2).
    assert tok.tokenize("a<|endoftext|>b") == [64, 50256, 65]
    assert tok.detokenize([64, 50256, 65]) == "a<|endoftext|>b"


def test_detokenize_is_lossless_on_corpora(by_backend, corpus_docs, reference_ids):
    tok = by_backend["python"]  # decoding is the same code for every backend
    for doc, ids in zip(corpus_docs, reference_ids):
        assert tok.detokenize(ids) == doc
    # A multi-byte character split over two tokens decodes only once both bytes are there.
    ids = tok.tokenize("\U0001d538")
    assert len(ids) == 3 and tok.detokenize(ids) == "\U0001d538"
    assert "\ufffd" in tok.detokenize(ids[:1])


def test_added_special_tokens(assets):
    for backend in BACKENDS:
        tok = _make(assets, backend, special_tokens=["<|pad|>", "<|sep|>"])
        assert tok.vocab_size == 50259
        assert tok.additional_special_tokens_ids == [50257, 50258]
        assert tok.tokenize("x<|sep|> y<|pad|>") == [87, 50258, 331, 50257], backend
        assert tok.detokenize([87, 50258, 331]) == "x<|sep|> y"


def test_tiktoken_ranks_reject_files_out_of_gpt2_order(assets):
    vocab, merges = load_gpt2_files(*_files(assets))
    assert tiktoken_ranks(vocab, merges) is not None
    swapped = list(merges)
    swapped[10], swapped[20] = swapped[20], swapped[10]
    assert tiktoken_ranks(vocab, swapped) is None


def test_unique_identifiers_name_class_and_files(assets, by_backend):
    tok = by_backend["python"]
    ident = tok.unique_identifiers
    assert ident["class"] == "GPT2BPETokenizer"
    assert ident["tokenizer_path"] == list(_files(assets))


def test_split_without_regex_package_matches_on_corpora(corpus_docs, monkeypatch):
    """The stdlib fallback pattern splits like GPT-2's \\p{L}/\\p{N} pattern on the corpora."""
    regex = pytest.importorskip("regex")
    from megatron.training.tokenizer import gpt2_bpe

    exact = regex.compile(gpt2_bpe.GPT2_SPLIT_PATTERN)
    monkeypatch.setitem(__import__("sys").modules, "regex", None)
    fallback = gpt2_bpe._compile_split_pattern()
    assert fallback.__class__.__module__ == "re"
    for doc in corpus_docs:
        assert fallback.findall(doc) == exact.findall(doc)
