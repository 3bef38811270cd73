"""GPT samples: the tokens read, the masks and position ids, and padding."""

import numpy
import pytest
import torch

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.gpt_masks import get_ltor_masks_and_position_ids
from tests.core.datasets.fixtures import EOD, TinyTokenizer, random_documents, write_dataset

S = 16


def _build(tmp_path, docs, sizes=(None, None, None), split="1", tokenizer=None, **kw):
    prefix = write_dataset(str(tmp_path / "d"), docs)
    config = GPTDatasetConfig(random_seed=3, sequence_length=S, blend=([prefix], None), split=split,
                              path_to_cache=str(tmp_path / "c"), tokenizer=tokenizer or TinyTokenizer(), **kw)
    return BlendedMegatronDatasetBuilder(GPTDataset, list(sizes), lambda: True, config).build()


def test_samples_are_windows_of_the_shuffled_stream(tmp_path):
    docs = random_documents(60, seed=4)
    train = _build(tmp_path, docs, sizes=(150, None, None))[0]
    stream = numpy.concatenate([docs[d] for d in train.document_index]).astype(numpy.int64)
    for i in range(len(train)):
        j = int(train.shuffle_index[i])
        window = torch.from_numpy(stream[j * S: j * S + S + 1])
        sample = train[i]
        assert torch.equal(sample["tokens"], window[:-1]) and torch.equal(sample["labels"], window[1:])
    assert set(train[0]) == {"tokens", "labels", "attention_mask", "loss_mask", "position_ids"}


def _reference_masks(tokens, reset_position_ids, reset_attention_mask, eod_mask_loss):
    s = len(tokens)
    allowed = numpy.tril(numpy.ones((s, s), dtype=bool))
    positions = numpy.arange(s)
    loss = numpy.ones(s, dtype=numpy.float32)
    start = 0
    for i in range(s):
        if eod_mask_loss and tokens[i] == EOD:
            loss[i] = 0
        if reset_position_ids:
            positions[i] = i - start
        if reset_attention_mask:
            allowed[i, :start] = False
        if tokens[i] == EOD:
            start = i + 1
    return ~allowed, loss, positions


@pytest.mark.parametrize("reset_position_ids", [False, True])
@pytest.mark.parametrize("reset_attention_mask", [False, True])
@pytest.mark.parametrize("eod_mask_loss", [False, True])
def test_masks_and_positions(reset_position_ids, reset_attention_mask, eod_mask_loss):
    rng = numpy.random.RandomState(0)
    for trial in range(10):
        tokens = rng.randint(0, 4, size=24)  # many EODs (id 0), including first and last place
        mask, loss, pos = get_ltor_masks_and_position_ids(torch.from_numpy(tokens), EOD, reset_position_ids,
                                                          reset_attention_mask, eod_mask_loss, True)
        ref_mask, ref_loss, ref_pos = _reference_masks(tokens, reset_position_ids, reset_attention_mask, eod_mask_loss)
        assert mask.shape == (1, 24, 24) and mask.dtype == torch.bool
        numpy.testing.assert_array_equal(mask[0].numpy(), ref_mask)
        numpy.testing.assert_array_equal(loss.numpy(), ref_loss)
        numpy.testing.assert_array_equal(pos.numpy(), ref_pos)
    assert get_ltor_masks_and_position_ids(torch.from_numpy(tokens), EOD, True, True, True, False)[0] is None


def test_partial_validation_sample_is_padded(tmp_path):
    docs = random_documents(40, seed=5)
    valid = _build(tmp_path, docs, split="0,1,0", drop_last_partial_validation_sequence=False)[1]
    total = sum(len(d) for d in docs)
    assert len(valid) == -(-(total - 1) // S)
    last = valid.shuffle_index.tolist().index(len(valid) - 1)
    sample = valid[last]
    real = total - 1 - (len(valid) - 1) * S  # labels that exist in the final window
    assert sample["loss_mask"][:real].sum() == real and sample["loss_mask"][real:].sum() == 0
    assert (sample["labels"][real:] == 0).all() and (sample["tokens"][real + 1:] == 0).all()


def test_pad_id_labels_are_not_trained(tmp_path):
    docs = [numpy.array([5, 7, 9, 7, EOD], dtype=numpy.int32)] * 30
    train = _build(tmp_path, docs, tokenizer=TinyTokenizer(pad=7))[0]
    stream = numpy.concatenate([docs[d] for d in train.document_index])
    j = int(train.shuffle_index[0])
    original_labels = torch.from_numpy(stream[j * S + 1: j * S + S + 1].astype(numpy.int64))
    sample = train[0]
    # Labels equal to the pad id (7) are masked and mapped to 0; EOD labels (0) still train.
    assert torch.equal(sample["loss_mask"] == 0, original_labels == 7)
    assert (sample["labels"][original_labels == 7] == 0).all()
    padding = train[None]
    assert padding["loss_mask"].sum() == 0


def test_mock_dataset_through_the_builder():
    config = GPTDatasetConfig(random_seed=1234, sequence_length=32, tokenizer=TinyTokenizer(eod=511, vocab_size=512))
    train, valid, test = BlendedMegatronDatasetBuilder(MockGPTDataset, [16, 8, 0], lambda: True, config).build()
    assert test is None and len(train) >= 16 and len(valid) >= 8
    numpy.testing.assert_array_equal(train.indices, numpy.arange(0, 33333))
    numpy.testing.assert_array_equal(valid.indices, numpy.arange(33333, 66667))
    tokens = train[0]["tokens"]
    assert tokens.max() <= 511 and tokens.shape == (32,)


def test_pad_id_equal_to_eod_is_not_masked_unless_allowed(tmp_path):
    docs = [numpy.array([5, 7, 9, 7, EOD], dtype=numpy.int32)] * 30
    train = _build(tmp_path, docs, tokenizer=TinyTokenizer(pad=EOD))[0]
    assert train[0]["loss_mask"].sum() == S  # EOD labels still train
    allowed = _build(tmp_path, docs, tokenizer=TinyTokenizer(pad=EOD), allow_ambiguous_pad_tokens=True)[0]
    assert allowed[0]["loss_mask"].sum() < S
