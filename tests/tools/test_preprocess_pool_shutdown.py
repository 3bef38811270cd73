"""The encoding pool shuts down with close() + join() when every batch is done: terminate()
after close() could block forever on the task queue's lock (preprocess_data with
--partitions 2 and several workers hung in about one run in four). An error still
terminates the pool."""

import multiprocessing
import multiprocessing.pool

import pytest

from megatron.training.data_preprocessing import pipeline


class _Doubling:
    def encode_batch(self, batch):
        return [2 * x for x in batch]


@pytest.fixture
def terminations(monkeypatch):
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("the pool is forked here only where fork exists")
    calls = []
    original = multiprocessing.pool.Pool.terminate

    def terminate(self):
        calls.append(self)
        original(self)

    monkeypatch.setattr(multiprocessing.pool.Pool, "terminate", terminate)
    return calls


def test_a_finished_pool_is_closed_and_joined_not_terminated(terminations):
    out = list(pipeline.encode_batches([[1, 2], [3]], _Doubling(), workers=2))
    assert out == [[2, 4], [6]]
    assert terminations == []


def test_an_abandoned_pool_is_terminated(terminations):
    batches = pipeline.encode_batches([[1], [2], [3]], _Doubling(), workers=2)
    assert next(batches) == [2]
    batches.close()
    assert len(terminations) == 1
