"""A tiny WordPiece vocabulary and sentence-level (or document-level) .bin/.idx corpora for
the masked-dataset tests."""

from __future__ import annotations

import numpy

from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [f"w{i}" for i in range(40)]
PIECES = [f"##p{i}" for i in range(15)]
VOCAB = SPECIALS + WORDS + PIECES


def write_vocab(path) -> str:
    path.write_text("\n".join(VOCAB) + "\n")
    return str(path)


def bert_tokenizer(tmp_path):
    from megatron.training.tokenizer.bert_wordpiece import BertWordPieceTokenizer

    return BertWordPieceTokenizer(write_vocab(tmp_path / "vocab.txt"), lower_case=True)


def _sentence(rng) -> list:
    """Words, some followed by ## continuations (so whole-word masking matters)."""
    out = []
    for _ in range(int(rng.integers(2, 9))):
        out.append(VOCAB.index(WORDS[int(rng.integers(len(WORDS)))]))
        for _ in range(int(rng.choice([0, 0, 1, 2]))):
            out.append(VOCAB.index(PIECES[int(rng.integers(len(PIECES)))]))
    return out


def write_corpus(prefix: str, num_documents: int = 40, seed: int = 0, sentence_level: bool = True) -> str:
    """Documents of 1-6 sentences (one sequence per document when not sentence_level)."""
    rng = numpy.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.int32)
    for _ in range(num_documents):
        sentences = [_sentence(rng) for _ in range(int(rng.integers(1, 7)))]
        if sentence_level:
            for sentence in sentences:
                builder.add_item(numpy.array(sentence, dtype=numpy.int32))
        else:
            builder.add_item(numpy.array(sum(sentences, []), dtype=numpy.int32))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix
