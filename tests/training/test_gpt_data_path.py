"""pretrain_gpt trains from a preprocessed .bin/.idx (--data-path, --split, --data-cache-path).

Same tolerance reasoning as test_gpt_parity: float32 sums in another order drift by
~1e-7 relative; 2e-5 on the loss is far above that and far below any data mix-up (reading
another sample changes the loss in the second decimal).
"""

import os

import numpy
import pytest

from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from tests.multirank import run_on_ranks
from tests.training.gpt_runs import TINY_GPT, _run_pretrain, losses

RTOL = 2e-5
EOD = 511  # NullTokenizer's end-of-document id with --vocab-size 512


def _write_corpus(prefix, num_docs=400, seed=0):
    """Documents counting up by one from a random start: a pattern a tiny GPT learns fast."""
    rng = numpy.random.RandomState(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.uint16)
    for _ in range(num_docs):
        start, length = rng.randint(0, 500), rng.randint(5, 60)
        doc = numpy.append((start + numpy.arange(length)) % 500 + 1, EOD)
        builder.add_document(doc, [len(doc)])
    builder.finalize(prefix + ".idx")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gptdata")
    prefix, other = str(folder / "counting_text_document"), str(folder / "other_text_document")
    _write_corpus(prefix)
    _write_corpus(other, num_docs=200, seed=1)
    return prefix, str(folder / "cache"), other


def _argv(corpus, *extra, data=None, iters=10):
    prefix, cache, _ = corpus
    base = [a for a in TINY_GPT if a != "--mock-data"]
    base[base.index("--eval-iters") + 1] = "2"
    return base + ["--data-path", *(data or [prefix]), "--split", "90,10,0", "--data-cache-path", cache,
                   "--eval-interval", "5", "--train-iters", str(iters), *extra]


def run_gpt(world_size, argv):
    """The last rank's log of pretrain_gpt run with exactly ``argv``."""
    return run_on_ranks(_run_pretrain, world_size, args=(argv, None), timeout=400)[-1]


def _blend(corpus):
    return ["0.7", corpus[0], "0.3", corpus[2]]


@pytest.fixture(scope="module")
def single(corpus):
    """One process training on a weighted blend of the two corpora."""
    return run_gpt(1, _argv(corpus, data=_blend(corpus)))


def test_trains_from_data_path_with_falling_loss(single, corpus):
    got = losses(single)
    assert len(got) >= 10 and got[9] < got[0] - 0.1, got
    assert "validation loss at iteration 10" in single
    cached = os.listdir(corpus[1])
    assert any(f.endswith("-GPTDataset-train-shuffle_index.npy") for f in cached)
    assert any(f.endswith("-GPTDataset-valid-description.txt") for f in cached)
    assert any("-BlendedDataset-train-" in f for f in cached)


def test_data_parallel_ranks_read_their_slices_of_a_blend(single, corpus):
    # Two data-parallel ranks each read half of every global batch of a weighted blend from
    # the caches rank 0 wrote; any other slicing or order changes the losses.
    ref = losses(single)[:10]
    got = losses(run_gpt(2, _argv(corpus, data=_blend(corpus))))[:10]
    assert len(got) == 10
    for i, (x, y) in enumerate(zip(got, ref)):
        assert abs(x - y) <= RTOL * abs(y), f"iteration {i + 1}: {x} vs {y}"
