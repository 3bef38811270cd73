"""TikTokenizer: ids equal a tiktoken Encoding built directly from the same ranks, shifted."""

import base64
import json

import pytest

tiktoken = pytest.importorskip("tiktoken")

from megatron.training.tokenizer.tiktokenizer import TIKTOKEN_PATTERNS, TikTokenizer  # noqa: E402

# Megatron-LM's pattern strings, written out here so that a change to the module's copy fails.
MEGATRON_V1 = r"[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"
MEGATRON_V2 = (
    "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+|"
    "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*|"
    "\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
SPECIALS = ["<unk>", "<s>", "</s>", "<mask>", "<pad>", "<cls>", "<sep>"]
NUM_SPECIAL = 1000


def _read_tiktoken(path):
    """Token bytes by rank from a '.tiktoken' file (base64 and rank per line)."""
    ranked = {}
    with open(path, "rb") as f:
        for line in f:
            b64, rank = line.split()
            ranked[int(rank)] = base64.b64decode(b64)
    return [ranked[r] for r in range(len(ranked))]


@pytest.fixture(scope="module")
def gpt2_json(assets, tmp_path_factory):
    """r50k ranks in Megatron's JSON format: the first 256 entries reordered to be bytes 0..255."""
    tokens = _read_tiktoken(assets / "tokenizers" / "tiktoken" / "gpt2.tiktoken")
    tokens = [bytes([i]) for i in range(256)] + tokens[256:]
    entries = [{"rank": i, "token_bytes": base64.b64encode(t).decode(), "token_str": t.decode("utf-8", "replace")}
               for i, t in enumerate(tokens)]
    path = tmp_path_factory.mktemp("tiktoken") / "gpt2_megatron.json"
    path.write_text(json.dumps(entries))
    return str(path), tokens


def _reference(tokens, pattern, vocab_size):
    ranks = {t: i + NUM_SPECIAL for i, t in enumerate(tokens[: vocab_size - NUM_SPECIAL])}
    specials = SPECIALS + [f"<SPECIAL_{i}>" for i in range(len(SPECIALS), NUM_SPECIAL)]
    return tiktoken.Encoding(name="ref", pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens={t: i for i, t in enumerate(specials)})


def test_patterns_are_megatrons():
    assert TIKTOKEN_PATTERNS == {"v1": MEGATRON_V1, "v2": MEGATRON_V2}


@pytest.mark.parametrize("pattern", ["v1", "v2"])
def test_json_ranks_match_tiktoken_and_roundtrip(gpt2_json, corpus_docs, pattern):
    path, tokens = gpt2_json
    vocab_size = len(tokens) + NUM_SPECIAL
    tok = TikTokenizer(path, pattern=pattern, vocab_size=vocab_size)
    ref = _reference(tokens, {"v1": MEGATRON_V1, "v2": MEGATRON_V2}[pattern], vocab_size)
    for doc in corpus_docs:
        ids = tok.tokenize(doc)
        assert ids == ref.encode(doc, allowed_special="all")
        assert tok.detokenize(ids) == doc
    assert tok.vocab_size == vocab_size


def test_special_ids_and_specials_in_text(gpt2_json):
    path, tokens = gpt2_json
    tok = TikTokenizer(path, pattern="v2", vocab_size=len(tokens) + NUM_SPECIAL)
    assert (tok.unk, tok.bos, tok.eos, tok.eod, tok.mask, tok.pad, tok.cls, tok.sep) == (0, 1, 2, 2, 3, 4, 5, 6)
    assert tok.additional_special_tokens_ids == [3, 4, 5, 6]
    ids = tok.tokenize("a</s><SPECIAL_7>b")
    assert ids == [NUM_SPECIAL + ord("a"), 2, 7, NUM_SPECIAL + ord("b")]
    assert tok.detokenize(ids) == "a</s><SPECIAL_7>b"


def test_vocab_cut_and_custom_specials(gpt2_json):
    path, _ = gpt2_json
    custom = ["<pad>", "<s>", "</s>", "<unk>", "<mask>", "<cls>", "<sep>", "<|im_start|>"]
    tok = TikTokenizer(path, pattern="v2", vocab_size=16 + 300, num_special_tokens=16, special_tokens=custom)
    text = "The quick brown fox jumps over the lazy dog <|im_start|>"
    ids = tok.tokenize(text)
    assert max(ids) < 316 and 7 in ids
    assert (tok.pad, tok.bos, tok.eod) == (0, 1, 2)
    assert tok.additional_special_tokens_ids == [0, 4, 5, 6, 7]
    assert tok.detokenize(ids) == text


def test_tiktoken_file_format(assets, corpus_docs):
    path = assets / "tokenizers" / "tiktoken" / "9b5ad71b2ce5302211f9c61530b329a4922fc6a4"  # cl100k_base
    tokens = _read_tiktoken(path)
    vocab_size = len(tokens) + NUM_SPECIAL
    tok = TikTokenizer(str(path), pattern="v1", vocab_size=vocab_size)
    ref = _reference(tokens, MEGATRON_V1, vocab_size)
    for doc in corpus_docs[:50] + corpus_docs[-12:]:
        assert tok.tokenize(doc) == ref.encode(doc, allowed_special="all")


def test_bad_inputs_name_the_flag(gpt2_json, tmp_path):
    path, _ = gpt2_json
    with pytest.raises(ValueError, match="--vocab-size 131072"):
        TikTokenizer(path)  # default vocab 2**17 needs more ranks than r50k has
    with pytest.raises(ValueError, match="--tiktoken-pattern"):
        TikTokenizer(path, pattern="v3", vocab_size=2000)
    with pytest.raises(ValueError, match="--tokenizer-special-tokens"):
        TikTokenizer(path, vocab_size=2000, special_tokens=["<s>", "</s>"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"rank": 0, "token_bytes": base64.b64encode(b"x").decode(), "token_str": "x"}]))
    with pytest.raises(ValueError, match="single byte 0"):
        TikTokenizer(str(bad), vocab_size=2000)
