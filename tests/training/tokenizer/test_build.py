"""build_tokenizer dispatch, flag errors, and the padded vocabulary size."""

from argparse import Namespace

import pytest

from megatron.training.tokenizer import NullTokenizer, build_tokenizer, padded_vocab_size, vocab_size_with_padding


def _args(**kw):
    return Namespace(**kw)


def _type_args(assets, kind, tmp_path):
    tk = assets / "tokenizers"
    files = {
        "BertWordPieceLowerCase": dict(vocab_file=str(tk / "bert-base-uncased/vocab.txt")),
        "BertWordPieceCase": dict(vocab_file=str(tk / "bert-base-uncased/vocab.txt")),
        "GPT2BPETokenizer": dict(vocab_file=str(tk / "gpt2/vocab.json"), merge_file=str(tk / "gpt2/merges.txt")),
        "SentencePieceTokenizer": dict(tokenizer_model=str(tk / "sentencepiece/mistral-7b-v0.1.model")),
        "GPTSentencePieceTokenizer": dict(tokenizer_model=str(tk / "sentencepiece/mistral-7b-v0.1.model")),
        "Llama2Tokenizer": dict(tokenizer_model=str(tk / "sentencepiece/mistral-7b-v0.1.model")),
        "TikTokenizer": dict(tokenizer_model=str(tk / "tiktoken/gpt2.tiktoken"), vocab_size=51256,
                             tiktoken_pattern="v2"),
        "NullTokenizer": dict(vocab_size=512),
    }
    return _args(tokenizer_type=kind, **files[kind])


# (type, vocab size, eod id, ids of "Hello world")
EXPECTED = [
    ("BertWordPieceLowerCase", 30522, 102, [7592, 2088]),
    # HEAD always adds 100 <extra_id_i>; cased, so "Hello" is [UNK] in the uncased vocab.
    ("BertWordPieceCase", 30622, 102, [100, 2088]),
    ("GPT2BPETokenizer", 50257, 50256, [15496, 995]),
    ("SentencePieceTokenizer", 32000, 2, [22557, 1526]),
    ("GPTSentencePieceTokenizer", 32000, 2, [22557, 1526]),
    ("Llama2Tokenizer", 32000, 2, [22557, 1526]),
    ("TikTokenizer", 51256, 2, [1000 + 15496, 1000 + 995]),
    ("NullTokenizer", 512, 511, None),
]


@pytest.mark.parametrize("kind,vocab,eod,hello", EXPECTED, ids=[e[0] for e in EXPECTED])
def test_every_type_builds(assets, tmp_path, kind, vocab, eod, hello):
    if kind in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer"):
        pytest.importorskip("sentencepiece")
    if kind == "TikTokenizer":
        pytest.importorskip("tiktoken")
    tok = build_tokenizer(_type_args(assets, kind, tmp_path))
    assert type(tok).__name__ in (kind, "BertWordPieceTokenizer")
    assert tok.vocab_size == vocab and tok.eod == eod
    if hello is not None:
        assert tok.tokenize("Hello world") == hello
    assert tok.unique_identifiers["class"]


def test_huggingface_type_builds_from_a_local_directory(assets, tmp_path):
    transformers = pytest.importorskip("transformers")
    ref = transformers.GPT2Tokenizer(vocab=str(assets / "tokenizers/gpt2/vocab.json"),
                                     merges=str(assets / "tokenizers/gpt2/merges.txt"))
    ref.save_pretrained(tmp_path)
    tok = build_tokenizer(_args(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(tmp_path)))
    assert tok.tokenize("Hello world") == [15496, 995] and tok.eod == 50256


def test_bert_lower_case_extra_ids(assets, tmp_path):
    args = _type_args(assets, "BertWordPieceLowerCase", tmp_path)
    args.vocab_extra_ids = 3
    tok = build_tokenizer(args)
    assert tok.vocab_size == 30525 and tok.additional_special_tokens_ids == [30522, 30523, 30524]


@pytest.mark.parametrize("kind,flag", [
    ("GPT2BPETokenizer", "--merge-file"),
    ("BertWordPieceCase", "--vocab-file"),
    ("SentencePieceTokenizer", "--tokenizer-model"),
    ("TikTokenizer", "--tokenizer-model"),
    ("HuggingFaceTokenizer", "--tokenizer-model"),
])
def test_missing_files_name_the_flag_and_path(assets, tmp_path, kind, flag):
    missing = str(tmp_path / "nope")
    args = _args(tokenizer_type=kind, vocab_file=str(assets / "tokenizers/gpt2/vocab.json"),
                 merge_file=missing, tokenizer_model=missing)
    if kind == "BertWordPieceCase":
        args.vocab_file = missing
    with pytest.raises(ValueError, match=rf"{flag} '.*nope' is not an existing"):
        build_tokenizer(args)
    dest = flag[2:].replace("-", "_")
    setattr(args, dest, None)
    with pytest.raises(ValueError, match=rf"needs {flag}"):
        build_tokenizer(args)


@pytest.mark.parametrize("kind", ["MultimodalTokenizer", "NullMultimodalTokenizer", "Bogus", None])
def test_unsupported_types(kind):
    with pytest.raises(ValueError, match="--tokenizer-type"):
        build_tokenizer(_args(tokenizer_type=kind))


def test_null_tokenizer_head_semantics():
    tok = build_tokenizer(_args(tokenizer_type="NullTokenizer", vocab_size=100))
    assert (tok.eod, tok.pad, tok.vocab_size) == (99, -1, 100)
    assert tok.tokenize("3 1 4") == [3, 1, 4] and tok.detokenize([3, 1, 4]) == "3 1 4"
    tok = build_tokenizer(_args(tokenizer_type="NullTokenizer", vocab_size=100, null_tokenizer_eod_id=0,
                                null_tokenizer_pad_id=5))
    assert (tok.eod, tok.pad) == (0, 5)
    with pytest.raises(ValueError, match="--null-tokenizer-eod-id"):
        NullTokenizer(100, eod_id=100)


def test_padded_vocab_size_rule():
    # ceil(V / (128 * TP)) * 128 * TP
    assert padded_vocab_size(50257, 128, 1) == 50304
    assert padded_vocab_size(50257, 128, 2) == 50432
    assert padded_vocab_size(50257, 128, 8) == 51200
    assert padded_vocab_size(32000, 128, 1) == 32000
    assert padded_vocab_size(30522, 128, 4) == 30720


def test_vocab_size_with_padding_flags():
    base = dict(make_vocab_size_divisible_by=128, tensor_model_parallel_size=8)
    assert vocab_size_with_padding(50257, _args(**base)) == 51200
    assert vocab_size_with_padding(50257, _args()) == 50304  # Megatron's defaults: 128, TP 1
    assert vocab_size_with_padding(50257, _args(padded_vocab_size=60000, **base)) == 60000
    assert vocab_size_with_padding(50257, _args(pad_vocab_size=False, **base)) == 50257
    with pytest.raises(ValueError, match="--padded-vocab-size 100"):
        vocab_size_with_padding(50257, _args(padded_vocab_size=100))


@pytest.mark.parametrize("kind", ["GPT2BPETokenizer", "BertWordPieceLowerCase", "Llama2Tokenizer", "TikTokenizer"])
def test_tokenizers_survive_pickling(assets, tmp_path, kind):
    """The preprocessing tool may hand a tokenizer to worker processes."""
    import pickle

    if kind == "Llama2Tokenizer":
        pytest.importorskip("sentencepiece")
    if kind == "TikTokenizer":
        pytest.importorskip("tiktoken")
    tok = build_tokenizer(_type_args(assets, kind, tmp_path))
    text = "Hello world, caf\u00e9 \u4e2d"
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.tokenize(text) == tok.tokenize(text) and clone.vocab_size == tok.vocab_size


def test_missing_optional_package_names_pip_and_extra(assets, tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "sentencepiece", None)
    with pytest.raises(ImportError, match=r"pip install sentencepiece.*\[tokenizers\]"):
        build_tokenizer(_type_args(assets, "Llama2Tokenizer", tmp_path))
