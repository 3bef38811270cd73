"""The chunked cross entropy is the default on GPU runs and off on CPU and under
--deterministic-mode, unless a flag says otherwise."""

import pytest
import torch

from megatron.training.arguments import parse_and_validate

BASE = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
        "--max-position-embeddings 16 --micro-batch-size 2").split()


def _fusion(extra="", cuda=False, monkeypatch=None):
    if monkeypatch is not None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    return parse_and_validate(BASE + extra.split(), world_size=1, rank=0).cross_entropy_loss_fusion


@pytest.mark.parametrize("extra, cuda, expected", [
    ("", False, False),
    ("", True, True),
    ("--deterministic-mode", True, False),
    ("--no-cross-entropy-loss-fusion", True, False),
    ("--cross-entropy-loss-fusion", False, True),
])
def test_default_follows_the_device(monkeypatch, extra, cuda, expected):
    assert _fusion(extra, cuda, monkeypatch) is expected


def test_asking_for_it_under_deterministic_mode_is_refused():
    with pytest.raises(ValueError, match="--cross-entropy-loss-fusion cannot be combined with --deterministic-mode"):
        _fusion("--cross-entropy-loss-fusion --deterministic-mode")
