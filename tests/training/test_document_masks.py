"""--reset-attention-mask, --reset-position-ids, --eod-mask-loss and the data loader's mask
flag, in every combination, through pretrain_gpt's real data path (mock dataset -> collate ->
get_batch -> model -> loss), checked against Megatron's semantics written out here:

- positions restart at 0 after each EOD with --reset-position-ids, else 0..s-1;
- EOD tokens get loss weight 0 with --eod-mask-loss, else every token counts;
- with --reset-attention-mask no token attends to an earlier document (the EOD belongs to
  the document it ends), whether the data loader built the mask or not; without it the mask
  is plain causal (passed as None).
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy
import pytest
import torch

import pretrain_gpt
from megatron.core.datasets.gpt_dataset import GPTDataset
from megatron.training import global_vars
from megatron.training.arguments import parse_and_validate

from megatron.training.tokenizer.build import build_tokenizer, vocab_size_with_padding
from tests.training.gpt_runs import TINY_GPT, losses, run_gpt

FLAGS = ("--reset-attention-mask", "--reset-position-ids", "--eod-mask-loss", "--no-create-attention-mask-in-dataloader")
COMBOS = list(itertools.product([False, True], repeat=len(FLAGS)))


def _expected(tokens, eod, reset_position_ids, eod_mask_loss):
    """Per-sample positions, loss mask and allowed[i][j] from the rules above, by loops."""
    positions, loss_mask, docs = [], [], []
    position, doc = 0, 0
    for token in tokens:
        positions.append(position if reset_position_ids else len(positions))
        loss_mask.append(0.0 if (eod_mask_loss and token == eod) else 1.0)
        docs.append(doc)
        position += 1
        if token == eod:
            position, doc = 0, doc + 1
    allowed = [[j <= i and docs[i] == docs[j] for j in range(len(tokens))] for i in range(len(tokens))]
    return positions, loss_mask, allowed


def _texts(eod):
    """Two samples of 33 tokens (32 inputs + the last label): three documents, and two."""
    first = [5, 6, 7, eod, 8, 9, 10, 11, 12, eod] + list(range(20, 43))
    second = list(range(100, 120)) + [eod] + list(range(200, 212))
    return [first, second]


def _sample(args, text):
    """What GPTDataset yields for ``text``, with the dataset config pretrain_gpt derives from args."""
    dataset = SimpleNamespace(config=pretrain_gpt.core_gpt_dataset_config_from_args(args), _pad_token_id=-1,
                              _query_document_sample_shuffle_indices=lambda idx: numpy.array(text))
    return GPTDataset.__getitem__(dataset, 0)


@pytest.fixture
def gpt_setup():
    def setup(flags):
        args = parse_and_validate([a for a in TINY_GPT if a not in ("--distributed-backend", "gloo")]
                                  + ["--train-iters", "1"] + flags)
        global_vars.set_args(args)
        tokenizer = build_tokenizer(args)
        global_vars.set_tokenizer(tokenizer)
        args.padded_vocab_size = vocab_size_with_padding(tokenizer.vocab_size, args)
        return args

    yield setup
    global_vars.unset_global_variables()


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "+".join(f[2:] for f, on in zip(FLAGS, c) if on) or "none")
def test_masks_positions_and_loss_follow_megatron(gpt_setup, combo):
    reset_attention, reset_positions, eod_mask_loss, no_loader_mask = combo
    args = gpt_setup([flag for flag, on in zip(FLAGS, combo) if on])
    eod = global_vars.get_tokenizer().eod
    batch = torch.utils.data.default_collate([_sample(args, text) for text in _texts(eod)])
    assert ("attention_mask" in batch) == (reset_attention and not no_loader_mask)

    tokens, labels, loss_mask, attention_mask, position_ids = pretrain_gpt.get_batch(iter([batch]))
    if not reset_attention:
        assert attention_mask is None
    for b in range(args.micro_batch_size):
        sample = tokens[b].tolist()
        assert eod in sample[:-1]
        positions, weights, allowed = _expected(sample, eod, reset_positions, eod_mask_loss)
        assert position_ids[b].tolist() == positions
        assert loss_mask[b].tolist() == weights
        if reset_attention:
            assert attention_mask.dtype == torch.bool and attention_mask.shape == (2, 1, 32, 32)
            assert (~attention_mask[b, 0]).tolist() == allowed

    torch.manual_seed(0)
    model = pretrain_gpt.model_provider()
    per_token = model(tokens, position_ids, attention_mask, labels=labels)
    loss, num_tokens, _ = pretrain_gpt.loss_func(loss_mask, per_token)
    assert torch.isfinite(loss) and num_tokens.item() == int(loss_mask.sum().item())
    # The document wall: changing the first token changes nothing after the first EOD.
    first_eod = tokens[0].tolist().index(eod)
    changed = tokens.clone()
    changed[0, 0] = (changed[0, 0] + 1) % eod if changed[0, 0] != eod - 1 else 0
    after = model(changed, position_ids, attention_mask, labels=labels)
    same = torch.equal(after[0, first_eod + 1:], per_token[0, first_eod + 1:])
    assert same == reset_attention


def test_pretrain_gpt_trains_with_document_masks_either_way():
    """The reported crashes: a dtype error with the loader's mask, a KeyError without it."""
    for extra in ([], ["--no-create-attention-mask-in-dataloader"]):
        log = run_gpt(1, ["--reset-attention-mask", "--reset-position-ids", "--eod-mask-loss"] + extra, iters=3)
        assert len(losses(log)) == 3, log
