"""pretrain_gpt with the data features of docs/data.md on one run: fill-in-the-middle samples
(--fim-data), the whole validation set at every evaluation (--full-validation), two validation
sets evaluated and logged apart (--multiple-validation-sets --validation-set-names)."""

import math
import re

import numpy
import pytest

from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from tests.multirank import run_on_ranks
from tests.training.gpt_runs import TINY_GPT, _run_pretrain, losses

EOD = 511  # NullTokenizer's end-of-document id with --vocab-size 512
S, GBS = 32, 8


def _write(prefix, num_docs, seed):
    rng = numpy.random.RandomState(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.uint16)
    tokens = 0
    for _ in range(num_docs):
        start, length = rng.randint(0, 400), rng.randint(5, 60)
        doc = numpy.append((start + numpy.arange(length)) % 400 + 1, EOD)
        builder.add_document(doc, [len(doc)])
        tokens += len(doc)
    builder.finalize(prefix + ".idx")
    return tokens


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("features")
    train, va, vb = (str(folder / n) for n in ("train", "valid_a", "valid_b"))
    _write(train, 300, 0)
    tokens = {"a": _write(va, 20, 1), "b": _write(vb, 45, 2)}
    base = [a for a in TINY_GPT if a != "--mock-data"]
    base[base.index("--eval-iters") + 1] = "2"
    argv = base + [
        "--train-data-path", train, "--valid-data-path", va, vb, "--data-cache-path", str(folder / "cache"),
        "--train-iters", "6", "--eval-interval", "3",
        "--full-validation", "--multiple-validation-sets", "--validation-set-names", "a", "b",
        # NullTokenizer's tokens are the ids written as text: 507..510 serve as the FIM tokens.
        "--fim-data", "--fim-rate", "0.9", "--fim-prefix-token", "507", "--fim-middle-token", "508",
        "--fim-suffix-token", "509", "--fim-pad-token", "510", "--fim-eod-token", "511",
    ]
    log = run_on_ranks(_run_pretrain, 1, args=(argv, None), timeout=400)[-1]
    # One epoch of validation samples of S + 1 tokens overlapping by one: (tokens - 1) // S.
    batches = {name: math.ceil(((t - 1) // S) / GBS) for name, t in tokens.items()}
    return log, batches


def test_each_validation_set_is_evaluated_whole_and_logged_under_its_name(run):
    log, batches = run
    assert len(losses(log)) >= 6
    for name, count in batches.items():
        blocks = re.findall(rf" validation-{name} loss at (iteration \d+[^|]*)\| lm loss value: ([0-9.E+-]+)", log)
        assert [b[0].strip() for b in blocks] == ["iteration 3", "iteration 6", "iteration 6 on validation set"]
        # The two evaluations of the same model read the same whole set, from its start.
        assert blocks[1][1] == blocks[2][1]
        assert f"evaluating validation-{name}: {count}/{count} batches" in log
    # The two sets differ, so their losses do.
    a = re.search(r" validation-a loss at iteration 3 \| lm loss value: ([0-9.E+-]+)", log).group(1)
    b = re.search(r" validation-b loss at iteration 3 \| lm loss value: ([0-9.E+-]+)", log).group(1)
    assert a != b
    assert "building train, validation, and test datasets for GPT (GPTFIMDataset)" in log
