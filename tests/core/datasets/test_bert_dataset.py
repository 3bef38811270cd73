"""BERTMaskedWordPieceDataset against reference loops written from the algorithm's
description (megatron-facts 3.6), plus caching, splits, blends and bad inputs.

The references are deliberately naive: one scalar Mersenne Twister draw at a time, the
textbook MT19937-64, nested n-gram lists, so they share no code with the implementation.
"""

import os

import numpy
import pytest

from megatron.core.datasets.bert_dataset import BERTMaskedWordPieceDataset, BERTMaskedWordPieceDatasetConfig
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.masked_sample_index import MT19937_64, build_sample_index
from megatron.core.datasets.split import Split
from tests.core.datasets.bert_corpus import bert_tokenizer, write_corpus

SEQ = 24


def _config(tokenizer, **overrides):
    kwargs = dict(
        random_seed=1234, sequence_length=SEQ, blend=None, split="1,1,1", tokenizer=tokenizer,
        masking_probability=0.15, short_sequence_probability=0.1, masking_max_ngram=3,
        masking_do_full_word=True, masking_do_permutation=False, masking_use_longer_ngrams=False,
        masking_use_geometric_distribution=False, classification_head=True,
    )
    kwargs.update(overrides)
    return BERTMaskedWordPieceDatasetConfig(**kwargs)


def _dataset(prefix, tokenizer, num_samples=None, **overrides):
    low = IndexedDataset(prefix)
    documents = numpy.arange(len(low.document_indices) - 1)
    config = _config(tokenizer, blend=([prefix], None), **overrides)
    return BERTMaskedWordPieceDataset(low, prefix, documents, num_samples, Split.train, config)


# --- reference sample index -------------------------------------------------------------

def _mt64_scalar(seed):
    """Textbook MT19937-64, one value at a time."""
    n, m, mask = 312, 156, (1 << 64) - 1
    mt = [seed & mask]
    for i in range(1, n):
        mt.append((6364136223846793005 * (mt[-1] ^ (mt[-1] >> 62)) + i) & mask)
    index = n
    while True:
        if index == n:
            for i in range(n):
                y = (mt[i] & 0xFFFFFFFF80000000) | (mt[(i + 1) % n] & 0x7FFFFFFF)
                mt[i] = mt[(i + m) % n] ^ (y >> 1) ^ (0xB5026F5AA96619E9 if y & 1 else 0)
            index = 0
        x = mt[index]
        index += 1
        x ^= (x >> 29) & 0x5555555555555555
        x ^= (x << 17) & 0x71D67FFFEDA60000
        x ^= (x << 37) & 0xFFF7EEE000000000
        x ^= x >> 43
        yield x


def _reference_sample_index(boundaries, lengths, num_samples, max_len, short_prob, seed, min_sent):
    state = numpy.random.RandomState(seed)
    ratio = int(numpy.floor(1.0 / short_prob + 0.5))  # C's round(): halves away from zero

    def target():
        r = int(state.randint(0, 2**32, dtype=numpy.uint64))
        return 2 + r % (max_len - 1) if r % ratio == 0 else max_len

    rows = []
    while len(rows) < num_samples:
        for d in range(len(boundaries) - 1):
            first, last = int(boundaries[d]), int(boundaries[d + 1])
            if last - first < min_sent:
                continue
            if last - first > 1 and max(lengths[first:last]) > 512:
                continue
            start, size, count, want = first, 0, 0, target()
            for s in range(first, last):
                size += int(lengths[s])
                count += 1
                left = last - s - 1
                if (size >= want and left > 1 and count >= min_sent) or left == 0:
                    rows.append([start, s + 1, want])
                    start, size, count, want = s + 1, 0, 0, target()
    gen = _mt64_scalar(seed + 1)
    for i in range(len(rows) - 1, 0, -1):
        j = next(gen) % (i + 1)
        rows[i], rows[j] = rows[j], rows[i]
    return numpy.array(rows)


def test_mersenne_twisters_match_the_cpp_standard():
    # [rand.predef]: the 10000th draw of a default-seeded engine
    assert int(MT19937_64(5489).draws(10000)[-1]) == 9981545732273789042
    assert int(numpy.random.RandomState(5489).randint(0, 2**32, size=10000, dtype=numpy.uint32)[-1]) == 4123659995
    gen = _mt64_scalar(77)
    numpy.testing.assert_array_equal(MT19937_64(77).draws(700), numpy.array([next(gen) for _ in range(700)],
                                                                            dtype=numpy.uint64))


@pytest.mark.parametrize("min_sent,short_prob", [(2, 0.1), (1, 0.4)])  # 1/0.4 = 2.5 rounds to 3
def test_sample_index_matches_reference(min_sent, short_prob):
    rng = numpy.random.default_rng(3)
    counts = rng.integers(1, 7, size=60)
    boundaries = numpy.concatenate(([0], numpy.cumsum(counts)))
    lengths = rng.integers(1, 30, size=int(boundaries[-1])).astype(numpy.int32)
    lengths[5] = 600  # a long sentence: its document is skipped when it has several sentences
    got = build_sample_index(boundaries, lengths, 1000, 400, 40, short_prob, 99, min_sent)
    expected = _reference_sample_index(boundaries, lengths, 400, 40, short_prob, 99, min_sent)
    assert got.dtype == numpy.uint32
    numpy.testing.assert_array_equal(got, expected)


# --- reference masking ---------------------------------------------------------------------

def _reference_mask(tokens, target, state, tokenizer, p=0.15, max_ngram=3):
    inv = tokenizer.inv_vocab
    candidates = []
    for i, t in enumerate(tokens):
        if t in (tokenizer.cls, tokenizer.sep):
            continue
        if inv[t].startswith("##") and candidates:
            candidates[-1].append(i)
        else:
            candidates.append([i])
    budget = min(p * target, max(1, int(round(len(tokens) * p))))
    sizes = numpy.arange(1, max_ngram + 1)
    probs = 1.0 / sizes
    probs = probs / probs.sum(keepdims=True)
    ngrams = [[candidates[i:i + n] for n in sizes] for i in range(len(candidates))]
    state.shuffle(ngrams)
    out, picked, done = list(tokens), [], set()
    lookup = list(inv.keys())
    for grams in ngrams:
        if len(picked) >= budget:
            break
        n = state.choice(sizes, p=probs / probs.sum(keepdims=True))
        chosen = None
        for k in range(n, 0, -1):
            flat = sum(grams[k - 1], [])
            if budget >= len(picked) + len(flat):
                chosen = flat
                break
        if chosen is None or any(i in done for i in chosen):
            continue
        for i in chosen:
            done.add(i)
            if state.random() < 0.8:
                out[i] = tokenizer.mask
            elif state.random() >= 0.5:
                out[i] = lookup[state.randint(0, len(lookup))]
            picked.append((i, tokens[i]))
    state.shuffle(ngrams)
    return out, sorted(picked)


def _reference_sample(dataset, idx, tokenizer, binary_head=True):
    begin, end, target = (int(x) for x in dataset.sample_index[idx])
    sentences = [list(map(int, dataset.dataset[i])) for i in range(begin, end)]
    state = numpy.random.RandomState((1234 + idx) % 2**32)
    pivot, swapped = len(sentences), False
    if binary_head:
        pivot = 1 if len(sentences) == 2 else state.randint(1, len(sentences))
        swapped = state.random() < 0.5
    a, b = sum(sentences[:pivot], []), sum(sentences[pivot:], [])
    if swapped:
        a, b = b, a
    cut = len(a) + len(b) > target
    while len(a) + len(b) > target:
        seg = a if len(a) > len(b) else b
        seg.pop(0 if state.random() < 0.5 else -1)
    tokens = [tokenizer.cls] + a + [tokenizer.sep] + ((b + [tokenizer.sep]) if b else [])
    types = [0] * (len(a) + 2) + [1] * (len(b) + 1 if b else 0)
    masked, picked = _reference_mask(tokens, target, state, tokenizer)
    pad = SEQ - len(tokens)
    labels = [-1] * SEQ
    for i, t in picked:
        labels[i] = t
    return dict(text=masked + [0] * pad, types=types + [0] * pad, labels=labels, is_random=int(swapped),
                padding_mask=[1] * len(tokens) + [0] * pad,
                loss_mask=[1 if lab != -1 else 0 for lab in labels], truncated=int(cut))


@pytest.mark.parametrize("binary_head", [True, False])
def test_samples_match_reference(tmp_path, binary_head):
    tokenizer = bert_tokenizer(tmp_path)
    prefix = write_corpus(str(tmp_path / "corpus"))
    dataset = _dataset(prefix, tokenizer, num_samples=60, classification_head=binary_head,
                       path_to_cache=str(tmp_path / "cache"))
    assert len(dataset) >= 60
    seen_truncated = seen_random = 0
    for idx in range(60):
        sample = dataset[idx]
        expected = _reference_sample(dataset, idx, tokenizer, binary_head)
        for key, value in expected.items():
            numpy.testing.assert_array_equal(sample[key], value, err_msg=f"sample {idx} field {key}")
        seen_truncated += sample["truncated"]
        seen_random += sample["is_random"]
    assert seen_truncated > 0  # the comparison covered the trimming loop
    assert (seen_random > 0) == binary_head


def test_masking_statistics(tmp_path):
    """~15% of text tokens predicted; of them ~80% [MASK], ~10% random, ~10% kept."""
    tokenizer = bert_tokenizer(tmp_path)
    prefix = write_corpus(str(tmp_path / "corpus"), num_documents=200)
    dataset = _dataset(prefix, tokenizer, num_samples=400, path_to_cache=str(tmp_path / "cache"))
    predicted = masked = kept = text = 0
    for idx in range(400):
        s = dataset[idx]
        where = s["loss_mask"] == 1
        text += int(s["padding_mask"].sum()) - 3
        predicted += int(where.sum())
        masked += int((s["text"][where] == tokenizer.mask).sum())
        kept += int((s["text"][where] == s["labels"][where]).sum())
        assert (s["labels"][~where] == -1).all()
    assert 0.10 < predicted / text < 0.17
    assert 0.74 < masked / predicted < 0.86
    assert 0.05 < kept / predicted < 0.16


@pytest.mark.parametrize("mask_prob,seq", [(0.15, SEQ), (0.3, 64)])
def test_masked_count_stays_within_the_lm_heads_limit(tmp_path, mask_prob, seq):
    """pretrain_bert runs the LM head on masked_positions_limit positions per sample: the
    dataset must never mark more (short samples included), and it does reach the limit."""
    from megatron.core.models.bert.masked_positions import masked_positions_limit

    tokenizer = bert_tokenizer(tmp_path)
    prefix = write_corpus(str(tmp_path / "corpus"), num_documents=200)
    dataset = _dataset(prefix, tokenizer, num_samples=300, path_to_cache=str(tmp_path / "cache"),
                       sequence_length=seq, masking_probability=mask_prob)
    counts = [int(dataset[idx]["loss_mask"].sum()) for idx in range(300)]
    limit = masked_positions_limit(mask_prob, seq)
    assert max(counts) <= limit
    assert max(counts) >= limit - 1


def test_cache_files_names_and_reuse(tmp_path):
    tokenizer = bert_tokenizer(tmp_path)
    prefix = write_corpus(str(tmp_path / "corpus"))
    cache = tmp_path / "cache"
    first = _dataset(prefix, tokenizer, num_samples=10, path_to_cache=str(cache))
    base = f"{first.unique_description_hash}-BERTMaskedWordPieceDataset-"
    assert sorted(os.listdir(cache)) == [base + "checksums.json", base + "description.txt", base + "sample_index.npy"]
    assert (cache / (base + "description.txt")).read_text() == first.unique_description
    assert list(first.unique_identifiers)[-8:] == [
        "masking_probability", "short_sequence_probability", "masking_max_ngram", "masking_do_full_word",
        "masking_do_permutation", "masking_use_longer_ngrams", "masking_use_geometric_distribution",
        "classification_head"]
    second = _dataset(prefix, tokenizer, num_samples=10, path_to_cache=str(cache))
    assert first.built_anew_on_cache_miss and not second.built_anew_on_cache_miss
    numpy.testing.assert_array_equal(first.sample_index, second.sample_index)
    # without --data-cache-path the cache sits next to the data, as in Megatron
    _dataset(prefix, tokenizer, num_samples=10)
    assert os.path.isdir(os.path.join(prefix, "cache", "BERTMaskedWordPieceDataset_indices"))


def test_splits_and_blends_through_the_builder(tmp_path):
    tokenizer = bert_tokenizer(tmp_path)
    a = write_corpus(str(tmp_path / "a"), seed=1)
    b = write_corpus(str(tmp_path / "b"), seed=2)
    cache = str(tmp_path / "cache")
    config = _config(tokenizer, blend=([a], None), split="6,2,2", path_to_cache=cache)
    train, valid, test = BlendedMegatronDatasetBuilder(
        BERTMaskedWordPieceDataset, [20, 5, 5], lambda: True, config).build()
    assert {len(train.indices), len(valid.indices), len(test.indices)} == {24, 8}
    assert set(train.indices).isdisjoint(valid.indices)
    blend_config = _config(tokenizer, blend=([a, b], [0.3, 0.7]), split="1,0,0", path_to_cache=cache)
    blended, _, _ = BlendedMegatronDatasetBuilder(
        BERTMaskedWordPieceDataset, [50, 0, 0], lambda: True, blend_config).build()
    assert len(blended) == 50
    ids = [blended[i]["dataset_id"] for i in range(50)]
    assert 10 <= ids.count(0) <= 20 and ids.count(0) + ids.count(1) == 50


def test_document_level_data_is_refused(tmp_path):
    tokenizer = bert_tokenizer(tmp_path)
    prefix = write_corpus(str(tmp_path / "docs"), sentence_level=False)
    with pytest.raises(ValueError, match="--split-sentences"):
        _dataset(prefix, tokenizer, num_samples=10, path_to_cache=str(tmp_path / "cache"))


def test_tokenizer_without_mask_is_refused(tmp_path):
    from megatron.training.tokenizer.null_tokenizer import NullTokenizer

    with pytest.raises(ValueError, match=r"\[MASK\].*BertWordPiece"):
        _config(NullTokenizer(100))


def test_mock_bert_dataset(tmp_path):
    from megatron.core.datasets.mock_bert_dataset import MockBERTMaskedWordPieceDataset

    config = _config(bert_tokenizer(tmp_path))
    train, valid, _ = BlendedMegatronDatasetBuilder(
        MockBERTMaskedWordPieceDataset, [16, 4, 0], lambda: True, config).build()
    sample = train[3]
    assert sample["text"].shape == (SEQ,) and sample["text"][0] == config.tokenizer.cls
    assert len(train) >= 16 and len(valid) >= 4
    numpy.testing.assert_array_equal(train[3]["text"], sample["text"])
