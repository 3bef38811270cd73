"""Fill-in-the-middle samples (--fim-data): the rewrite against a plain reference written
from the documented rules, determinism, and the errors a user can hit."""

import numpy
import pytest

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.training.datasets.fim_dataset import GPTFIMDataset, GPTFIMDatasetConfig
from tests.core.datasets.fixtures import write_dataset

SPECIALS = ["<eod>", "<pre>", "<mid>", "<suf>", "<pad>", "|"]
LETTERS = "abcdefghijklmnopqrstuvwxyz "
S = 48


class CharTokenizer:
    """One id per character; the special strings are single tokens."""

    def __init__(self, specials=SPECIALS):
        self.vocab = {tok: i for i, tok in enumerate(list(specials) + list(LETTERS))}
        self.inv = {i: tok for tok, i in self.vocab.items()}
        self.eod, self.pad, self.vocab_size = 0, -1, len(self.vocab)

    def tokenize(self, text):
        ids, i = [], 0
        while i < len(text):
            special = next((s for s in SPECIALS if text.startswith(s, i)), None)
            tok = special or text[i]
            ids.append(self.vocab[tok])
            i += len(tok)
        return ids

    def detokenize(self, ids):
        return "".join(self.inv[int(i)] for i in ids)

    @property
    def unique_identifiers(self):
        return {"class": "CharTokenizer"}


TOKENS = {"prefix": "<pre>", "middle": "<mid>", "suffix": "<suf>", "pad": "<pad>", "eod": "<eod>"}
EOD, PRE, MID, SUF, PAD, SPLIT = range(6)


def _documents(seed, n=40):
    rng = numpy.random.RandomState(seed)
    tok = CharTokenizer()
    docs = []
    for _ in range(n):
        words = ["".join(rng.choice(list("abcdefgh"), size=rng.randint(1, 6))) for _ in range(rng.randint(1, 8))]
        text = " ".join(words)
        if rng.rand() < 0.5:  # some documents hold fragments separated by the split token
            text = text.replace(" ", "|", 2)
        docs.append(numpy.array(tok.tokenize(text) + [EOD], dtype=numpy.int32))
    return docs


def _build(tmp_path, dataset_type=GPTFIMDataset, tokenizer=None, **fim):
    tmp_path.mkdir(parents=True, exist_ok=True)
    prefix = write_dataset(str(tmp_path / "d"), _documents(1))
    kwargs = dict(random_seed=5, sequence_length=S, blend=([prefix], None), split="1",
                  path_to_cache=str(tmp_path / "c"), tokenizer=tokenizer or CharTokenizer())
    if dataset_type is GPTFIMDataset:
        config = GPTFIMDatasetConfig(**kwargs, fim_extra_tokens=dict(TOKENS), **fim)
    else:
        config = GPTDatasetConfig(**kwargs)
    return BlendedMegatronDatasetBuilder(dataset_type, [60, None, None], lambda: True, config).build()[0]


def _reference_permute(ids, rate, spm_rate, no_prefix, rng, tok):
    """One segment, as the FIM paper and Megatron's docs describe it."""
    if not rng.binomial(1, rate):
        return list(ids)
    text = tok.detokenize(ids)
    if no_prefix is not None and text.startswith(no_prefix):
        return list(ids)
    cuts = sorted(rng.randint(low=0, high=len(text) + 1, size=2))
    prefix, middle, suffix = text[:cuts[0]], text[cuts[0]:cuts[1]], text[cuts[1]:]
    p, m, s = tok.tokenize(prefix), tok.tokenize(middle), tok.tokenize(suffix)
    if rng.binomial(1, spm_rate):
        return [PRE, SUF] + s + [MID] + p + m
    return [PRE] + p + [SUF] + s + [MID] + m


def _reference_pieces(ids, sep):
    """Runs between separators, the separators kept as their own pieces."""
    pieces, run = [], []
    for t in ids:
        if t == sep:
            if run:
                pieces.append(run)
            pieces.append(sep)
            run = []
        else:
            run.append(t)
    if run:
        pieces.append(run)
    return pieces


def _reference_sample(text, seed, idx, rate, spm_rate, split=None, fragment_rate=None, no_prefix=None):
    tok = CharTokenizer()
    rng = numpy.random.RandomState([seed, idx])
    out = []
    for piece in _reference_pieces(list(text), EOD):
        if piece == EOD:
            out.append(EOD)
        elif split is None or split not in piece:
            out += _reference_permute(piece, rate, spm_rate, no_prefix, rng, tok)
        elif not rng.binomial(1, rate):
            out += piece
        else:
            for frag in _reference_pieces(piece, split):
                out += [split] if frag == split else _reference_permute(frag, fragment_rate, spm_rate, no_prefix,
                                                                        rng, tok)
    out = out[:len(text)]
    return out + [PAD] * (len(text) - len(out))


@pytest.mark.parametrize("fim", [
    dict(fim_rate=0.5, fim_spm_rate=0.5),
    dict(fim_rate=1.0, fim_spm_rate=0.0),
    dict(fim_rate=1.0, fim_spm_rate=1.0, fim_no_prefix="a"),
    dict(fim_rate=0.8, fim_spm_rate=0.3, fim_split_sample="|", fim_fragment_rate=0.6),
])
def test_samples_match_the_reference_rewrite(tmp_path, fim):
    plain = _build(tmp_path / "plain", GPTDataset)
    ds = _build(tmp_path / "fim", **fim)
    rewritten = 0
    for i in range(len(ds)):
        text = plain._query_document_sample_shuffle_indices(i)
        want = _reference_sample(text, 5, i, fim["fim_rate"], fim["fim_spm_rate"],
                                 split=SPLIT if fim.get("fim_split_sample") else None,
                                 fragment_rate=fim.get("fim_fragment_rate"), no_prefix=fim.get("fim_no_prefix"))
        got = ds._query_document_sample_shuffle_indices(i)
        assert got.tolist() == want, i
        sample = ds[i]
        assert sample["tokens"].tolist() == want[:-1] and sample["labels"].tolist() == want[1:]
        rewritten += int(PRE in want)
    # Each case rewrites some samples (a transform that never fires would pass trivially).
    assert 0 < rewritten


def test_rate_zero_leaves_samples_unchanged(tmp_path):
    plain = _build(tmp_path / "plain", GPTDataset)
    ds = _build(tmp_path / "fim", fim_rate=0.0)
    for i in range(len(ds)):
        assert numpy.array_equal(ds._query_document_sample_shuffle_indices(i),
                                 plain._query_document_sample_shuffle_indices(i))


def test_a_sample_does_not_depend_on_what_was_read_before(tmp_path):
    a = _build(tmp_path / "a", fim_rate=1.0)
    b = _build(tmp_path / "b", fim_rate=1.0)
    forward = [a._query_document_sample_shuffle_indices(i).tolist() for i in range(len(a))]
    backward = [b._query_document_sample_shuffle_indices(i).tolist() for i in reversed(range(len(b)))][::-1]
    assert forward == backward
    assert forward[3] == a._query_document_sample_shuffle_indices(3).tolist()


def test_tokenizer_without_the_fim_tokens_names_the_flag(tmp_path):
    # no <pad>; "<sep>" keeps the vocabulary as large as the data's ids (checked at build)
    tokenizer = CharTokenizer(specials=["<eod>", "<pre>", "<mid>", "<suf>", "<sep>", "|"])
    with pytest.raises(ValueError, match="--fim-pad-token '<pad>'.*--tokenizer-special-tokens"):
        _build(tmp_path, tokenizer=tokenizer)


def test_split_sample_needs_a_fragment_rate(tmp_path):
    with pytest.raises(ValueError, match="--fim-fragment-rate"):
        _build(tmp_path, fim_split_sample="|")


def test_rates_are_probabilities(tmp_path):
    with pytest.raises(ValueError, match="--fim-spm-rate must be a probability"):
        _build(tmp_path, fim_spm_rate=1.5)
