"""--dist-ckpt-strictness on torch_dist loads: the strict modes refuse a checkpoint that does
not fit; the others load what fits, leave the rest at its initial values and print both
lists (a tensor the model has that the checkpoint lacks, and the reverse)."""

from __future__ import annotations

import pytest

from tests.multirank import RankFailure
from tests.training.gpt_runs import losses, run_gpt

SAVE_AT = ["--save-interval", "2", "--lr-decay-iters", "3"]


@pytest.fixture(scope="module")
def plain_checkpoint(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("plain"))
    run_gpt(1, ["--save", root, "--disable-bias-linear"] + SAVE_AT, iters=2)
    return root


def _load(root, *flags, iters=3):
    """A model with biases (8 more tensors) from the checkpoint of one without."""
    return run_gpt(1, ["--load", root, "--lr-decay-iters", "3"] + list(flags), iters=iters)


@pytest.mark.parametrize("mode", [None, "assume_ok_unexpected", "raise_unexpected", "raise_all"])
def test_strict_modes_refuse_a_model_with_more_tensors(plain_checkpoint, mode):
    flags = ["--no-load-optim"] + (["--dist-ckpt-strictness", mode] if mode else [])
    with pytest.raises(RankFailure, match="does not fit this model; nothing was loaded"):
        _load(plain_checkpoint, *flags)


@pytest.mark.parametrize("mode", ["log_unexpected", "log_all", "return_unexpected", "return_all", "ignore_all"])
def test_other_modes_load_what_fits_and_say_what_did_not(plain_checkpoint, mode):
    log = _load(plain_checkpoint, "--no-load-optim", "--dist-ckpt-strictness", mode)
    assert f"--dist-ckpt-strictness {mode}: 8 tensor(s) of this model are not in the checkpoint" in log
    assert "decoder.layers.0.self_attention.linear_qkv.bias" in log
    assert len(losses(log)) == 1  # iteration 3 trained from the loaded iteration 2


def test_optimizer_state_of_absent_tensors_cannot_be_restored(plain_checkpoint):
    with pytest.raises(RankFailure, match="load with --no-load-optim"):
        _load(plain_checkpoint, "--dist-ckpt-strictness", "log_all")


def test_checkpoint_with_more_tensors_is_read_in_part(tmp_path):
    root = str(tmp_path)
    run_gpt(1, ["--save", root] + SAVE_AT, iters=2)
    fewer = ["--load", root, "--disable-bias-linear", "--lr-decay-iters", "3", "--override-opt-param-scheduler"]
    with pytest.raises(RankFailure, match="key\\(s\\) in the checkpoint but not in this model"):
        run_gpt(1, fewer, iters=3)
    log = run_gpt(1, fewer + ["--dist-ckpt-strictness", "log_all"], iters=3)
    assert "--dist-ckpt-strictness log_all: not read, 8 key(s) in the checkpoint but not in this model" in log
    assert len(losses(log)) == 1
