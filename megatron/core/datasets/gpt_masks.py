"""Loss mask, position ids and attention mask of a left-to-right (GPT) sample."""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def get_ltor_masks_and_position_ids(
    tokens: torch.Tensor, eod_token: int, reset_position_ids: bool, reset_attention_mask: bool,
    eod_mask_loss: bool, create_attention_mask: bool,
) -> Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Masks of one sample ``tokens`` [S].

    Returns ``attention_mask`` (bool [1, S, S], True = masked: causal, and with
    ``reset_attention_mask`` also across documents; None unless ``create_attention_mask``),
    ``loss_mask`` (float [S], 0 at EOD with ``eod_mask_loss``) and ``position_ids``
    (int64 [S], restarting at 0 after each EOD with ``reset_position_ids``). The token after
    an EOD starts a new document; the EOD belongs to the document it ends.
    """
    s = tokens.numel()
    loss_mask = torch.ones(s, dtype=torch.float)
    if eod_mask_loss:
        loss_mask[tokens == eod_token] = 0.0
    position_ids = torch.arange(s, dtype=torch.long)
    eod_positions = (tokens == eod_token).nonzero().flatten()
    # Document id of each position: the number of EODs strictly before it.
    doc_ids = torch.zeros(s, dtype=torch.long)
    if eod_positions.numel():
        starts = eod_positions + 1
        starts = starts[starts < s]
        doc_ids.index_add_(0, starts, torch.ones_like(starts))
        doc_ids = doc_ids.cumsum(0)
    if reset_position_ids and eod_positions.numel():
        first_of_doc = torch.zeros(doc_ids.max().item() + 1, dtype=torch.long)
        first_of_doc[1:] = eod_positions[: first_of_doc.numel() - 1] + 1
        position_ids = position_ids - first_of_doc[doc_ids]
    attention_mask = None
    if create_attention_mask:
        index = torch.arange(s)
        allowed = index.unsqueeze(1) >= index.unsqueeze(0)  # lower triangle, diagonal included
        if reset_attention_mask:
            allowed &= doc_ids.unsqueeze(1) == doc_ids.unsqueeze(0)
        attention_mask = (~allowed).unsqueeze(0)
    return attention_mask, loss_mask, position_ids


def document_causal_mask(tokens: torch.Tensor, eod_token: int) -> torch.Tensor:
    """The attention mask of a batch ``tokens`` [b, s] whose documents must not see each
    other: bool [b, 1, s, s], True = masked (later positions, and other documents).

    The same mask ``get_ltor_masks_and_position_ids`` builds per sample with
    ``reset_attention_mask``, for callers that build it after the data loader
    (--no-create-attention-mask-in-dataloader): the EOD belongs to the document it ends.
    """
    eod = (tokens == eod_token).long()
    doc_ids = torch.cumsum(eod, dim=1) - eod  # EODs strictly before each position
    index = torch.arange(tokens.shape[1], device=tokens.device)
    allowed = (index.unsqueeze(1) >= index.unsqueeze(0)) & (doc_ids.unsqueeze(2) == doc_ids.unsqueeze(1))
    return (~allowed).unsqueeze(1)
