"""HuggingFaceTokenizer: a local directory saved by transformers, loaded without the network."""

import pytest

transformers = pytest.importorskip("transformers")

from megatron.training.tokenizer.huggingface_tokenizer import HuggingFaceTokenizer  # noqa: E402


@pytest.fixture(scope="module")
def saved_dirs(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    gpt2 = transformers.GPT2Tokenizer(vocab=str(assets / "tokenizers/gpt2/vocab.json"),
                                      merges=str(assets / "tokenizers/gpt2/merges.txt"))
    gpt2.save_pretrained(root / "gpt2")
    bert = transformers.BertTokenizer(vocab=str(assets / "tokenizers/bert-base-uncased/vocab.txt"),
                                      do_lower_case=True)
    bert.save_pretrained(root / "bert")
    return {"gpt2": (str(root / "gpt2"), gpt2), "bert": (str(root / "bert"), bert)}


def test_gpt2_directory(saved_dirs, corpus_docs):
    path, ref = saved_dirs["gpt2"]
    tok = HuggingFaceTokenizer(path, include_special_tokens=False)
    got = [tok.tokenize(d) for d in corpus_docs[:100]]
    assert got == ref(corpus_docs[:100], add_special_tokens=False)["input_ids"]
    assert tok.vocab_size == 50257
    assert (tok.eod, tok.bos, tok.pad, tok.mask) == (50256, 50256, -1, None)
    assert tok.detokenize(got[0]) == corpus_docs[0]


def test_bert_directory_with_special_tokens(saved_dirs, corpus_docs):
    path, _ = saved_dirs["bert"]
    tok = HuggingFaceTokenizer(path)  # Megatron's default includes the tokenizer's own specials
    assert tok.tokenize("Hello, world") == [101, 7592, 1010, 2088, 102]
    plain = HuggingFaceTokenizer(path, include_special_tokens=False)
    assert plain.tokenize("Hello, world") == [7592, 1010, 2088]
    # HEAD's fallbacks: eos <- sep and bos <- cls when the tokenizer has none.
    assert (tok.cls, tok.sep, tok.pad, tok.mask, tok.bos, tok.eos, tok.eod) == (101, 102, 0, 103, 101, 102, 102)


def test_added_special_tokens(saved_dirs):
    path, _ = saved_dirs["bert"]
    tok = HuggingFaceTokenizer(path, include_special_tokens=False, additional_special_tokens=["<extra_id_0>"])
    assert tok.vocab_size == 30523
    assert tok.additional_special_tokens_ids == [30522]
    assert tok.tokenize("a <extra_id_0> b") == [1037, 30522, 1038]


def test_missing_directory_fails_offline(tmp_path):
    with pytest.raises(ValueError, match="--tokenizer-model"):
        HuggingFaceTokenizer(str(tmp_path))
