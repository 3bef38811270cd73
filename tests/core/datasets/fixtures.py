"""Small datasets for the dataset tests: a tokenizer stand-in and .bin/.idx writers."""

from __future__ import annotations

from collections import OrderedDict
from typing import List

import numpy

from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

EOD = 0
VOCAB = 1000


class TinyTokenizer:
    """Just what the GPT datasets read: eod, pad, vocab size and cache identifiers."""

    def __init__(self, eod: int = EOD, pad: int = -1, vocab_size: int = VOCAB):
        self.eod, self.pad, self.vocab_size = eod, pad, vocab_size

    @property
    def unique_identifiers(self):
        return OrderedDict([("class", "TinyTokenizer"), ("tokenizer_path", []), ("eod", str(self.eod))])


def random_documents(num_docs: int, seed: int, max_len: int = 40) -> List[numpy.ndarray]:
    """Documents of 1..max_len non-EOD tokens, each followed by EOD (ids < VOCAB)."""
    rng = numpy.random.RandomState(seed)
    docs = []
    for _ in range(num_docs):
        body = rng.randint(1, VOCAB, size=rng.randint(1, max_len + 1))
        docs.append(numpy.concatenate([body, [EOD]]).astype(numpy.int32))
    return docs


def write_dataset(prefix: str, documents: List[numpy.ndarray]) -> str:
    """Write ``documents`` as ``prefix.bin/.idx`` (uint16 ids); returns the prefix."""
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.uint16)
    for doc in documents:
        builder.add_document(doc, [len(doc)])
    builder.finalize(prefix + ".idx")
    return prefix
