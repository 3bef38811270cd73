"""The masked-LM head on the masked positions only (``masked_positions.py``): the picks, and
that BertModel's loss and every gradient equal the full head's times the loss mask."""

import pytest
import torch

from megatron.core.models.bert import BertModel
from megatron.core.models.bert.masked_positions import (
    gather_positions, masked_positions_limit, scatter_losses, selected_positions, this_slice,
)
from megatron.core.transformer.transformer_config import TransformerConfig

VOCAB, SEQ = 64, 16


def test_limit_is_the_floor_of_the_datasets_budget():
    assert masked_positions_limit(0.15, 512) == 76
    assert masked_positions_limit(0.15, 128) == 19
    assert masked_positions_limit(0.01, 16) == 1  # the datasets mask at least one token


def test_selected_positions_put_masked_ones_first_in_order():
    mask = torch.tensor([[0, 1, 0, 0, 1, 0, 1, 0], [1, 0, 0, 0, 0, 0, 0, 1]], dtype=torch.float)
    assert selected_positions(mask, 4, 1).tolist() == [[1, 4, 6, 0], [0, 7, 1, 2]]
    # two slices of 4: each picks within its own half, offsets give positions in the sequence
    assert selected_positions(mask, 2, 2).tolist() == [[1, 0, 4, 6], [0, 1, 7, 4]]
    # a limit past the slice's width takes the whole slice
    assert selected_positions(mask, 9, 2).shape == (2, 8)
    with pytest.raises(ValueError, match="does not divide"):
        selected_positions(mask, 2, 3)


def test_this_slice_gather_and_scatter():
    mask = torch.tensor([[0, 1, 0, 0, 1, 0, 1, 0]], dtype=torch.float)
    positions = selected_positions(mask, 2, 2)  # [[1, 0, 4, 6]]
    assert this_slice(positions, 2, 1, 4).tolist() == [[0, 2]]
    hidden = torch.arange(8.0).view(8, 1, 1).expand(8, 1, 3)  # [s, b, h], value = position
    assert gather_positions(hidden, positions)[:, 0, 0].tolist() == [1.0, 0.0, 4.0, 6.0]
    losses = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    assert scatter_losses(losses, positions, 8).tolist() == [[20.0, 10.0, 0, 0, 30.0, 0, 40.0, 0]]


def _model(**config):
    cfg = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=2, use_cpu_initialization=True,
                            hidden_dropout=0.0, attention_dropout=0.0, **config)
    torch.manual_seed(0)
    return BertModel(cfg, num_tokentypes=2, vocab_size=VOCAB, max_sequence_length=SEQ)


def _batch():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (3, SEQ), generator=gen)
    loss_mask = torch.zeros(3, SEQ)
    loss_mask[0, [2, 5, 11]] = 1
    loss_mask[1, [0]] = 1
    loss_mask[2, [3, 4, 14]] = 1
    labels = torch.where(loss_mask > 0, torch.randint(0, VOCAB, (3, SEQ), generator=gen), -1)
    padding = torch.ones(3, SEQ)
    padding[2, 12:] = 0  # a masked position among the padding keys still counts
    return ids, padding, labels, loss_mask


def _loss_and_grads(model, picks: bool, limit: int = 3):
    ids, padding, labels, loss_mask = _batch()
    model.zero_grad()
    extra = {"loss_mask": loss_mask, "max_masked_positions": limit} if picks else {}
    lm, binary = model(ids, padding, tokentype_ids=torch.zeros_like(ids), lm_labels=labels, **extra)
    loss = (lm * loss_mask).sum() / loss_mask.sum() + binary.float().square().mean()
    loss.backward()
    return lm, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("limit", [3, 5, SEQ])
def test_picked_head_equals_full_head_under_the_mask(limit):
    model = _model()
    lm_full, loss_full, grads_full = _loss_and_grads(model, picks=False)
    lm_picked, loss_picked, grads_picked = _loss_and_grads(model, picks=True, limit=limit)
    ids, _, _, loss_mask = _batch()
    torch.testing.assert_close(lm_picked * loss_mask, lm_full * loss_mask, rtol=1e-6, atol=1e-6)
    assert ((lm_picked != 0).sum(1) <= limit).all()  # the head ran at `limit` positions per sequence at most
    torch.testing.assert_close(loss_picked, loss_full, rtol=1e-6, atol=1e-7)
    assert grads_picked.keys() == grads_full.keys()
    for name in grads_full:
        torch.testing.assert_close(grads_picked[name], grads_full[name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_limit_below_the_masked_count_changes_the_loss():
    """The bound matters: with fewer picks than masked positions the loss differs (which is
    why the limit is the dataset's own bound, never a guess)."""
    model = _model()
    _, loss_full, _ = _loss_and_grads(model, picks=False)
    _, loss_short, _ = _loss_and_grads(model, picks=True, limit=2)
    assert not torch.allclose(loss_short, loss_full)
