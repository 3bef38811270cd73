"""pretrain_hybrid.py saves a hybrid model in Megatron-LM's layout (--ckpt-megatron-lm-layout,
both formats) on two tensor-parallel ranks, and a one-rank run loads it (recognized as
Megatron-LM's, resharded) to the same weights as our own (torch_dist) checkpoint of the same
step: the fine-tuning losses after either load are equal, bit for bit."""

import re

import pytest

from megatron.training.checkpointing import megatron_lm
from tests.training.mamba_runs import run_hybrid

SAVE_AT = 3


def _saved(tmp_path, name, extra):
    save = str(tmp_path / name)
    run_hybrid(2, ["--tensor-model-parallel-size", "2", "--save", save, "--save-interval", str(SAVE_AT),
                   "--exit-interval", str(SAVE_AT)] + extra, iters=SAVE_AT)
    return save


def _finetune_losses(load):
    log = run_hybrid(1, ["--load", load, "--finetune", "--no-load-optim", "--no-load-rng"], iters=3)
    values = re.findall(r"lm loss: ([0-9.E+-]+)", log)
    assert len(values) == 3, log
    return values


@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
def test_megatron_layout_hybrid_checkpoint_reloads_resharded(tmp_path, fmt):
    ours = _saved(tmp_path, "ours", ["--ckpt-format", "torch_dist"])  # our torch format does not reshard
    theirs = _saved(tmp_path, "megatron", ["--ckpt-format", fmt, "--ckpt-megatron-lm-layout"])
    assert megatron_lm.is_megatron_checkpoint(f"{theirs}/iter_{SAVE_AT:07d}")
    assert not megatron_lm.is_megatron_checkpoint(f"{ours}/iter_{SAVE_AT:07d}")
    assert _finetune_losses(theirs) == _finetune_losses(ours)
