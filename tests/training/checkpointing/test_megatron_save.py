"""--ckpt-megatron-lm-layout writes what Megatron-LM writes: for the fixture's model the
same keys, shapes and common-state entries as the checkpoint Megatron-LM saved, with args
that unpickle without any class of ours; and it loads back here bit-exactly."""

import argparse
import os

import pytest
import torch

from megatron.core.safe_unpickle import TORCH_TENSORS
from megatron.training.checkpointing.megatron_lm import legacy, pickles, torch_dist
from tests.training.checkpointing.ckpt_runs import run_ckpt
from tests.training.checkpointing.megatron_cases import FIXTURE, FIXTURE_FLAGS, assert_megatron_logits, needs_fixture

# What Megatron-LM's own loader needs to unpickle our args: nothing of this framework.
PLAIN = {("argparse", "Namespace"): argparse.Namespace, **TORCH_TENSORS}


def _tensor_layout(directory):
    saved = torch_dist.read_metadata(directory).state_dict_metadata
    return {key: (tuple(entry.size), entry.properties.dtype) if hasattr(entry, "size") else "bytes"
            for key, entry in saved.items()}


def _check_torch_dist(saved_dir):
    fixture_dir = str(FIXTURE / "torch_dist" / "iter_0000010")
    assert _tensor_layout(saved_dir) == _tensor_layout(fixture_dir)
    ours, theirs = torch_dist.read_common(saved_dir), torch_dist.read_common(fixture_dir)
    assert sorted(ours) == sorted(theirs)
    assert ours["iteration"] == 11 and ours["checkpoint_version"] == theirs["checkpoint_version"]
    assert ours["content_metadata"] == theirs["content_metadata"]
    metadata = torch_dist.read_metadata(saved_dir)
    for key in metadata.state_dict_metadata:
        if "_extra_state" in key:
            assert pickles.read_object(saved_dir, metadata, key) == [None]
    info = metadata.storage_data[pickles.dcp_metadata.MetadataIndex(torch_dist.COMMON_KEY)]
    with open(os.path.join(saved_dir, info.relative_path), "rb") as handle:
        handle.seek(info.offset)
        common = pickles.restricted_torch_load(handle.read(info.length), PLAIN)[0]
    _check_args(common["args"])


def _check_torch(saved_dir):
    ours = pickles.restricted_torch_load(os.path.join(saved_dir, "mp_rank_00", "model_optim_rng.pt"), PLAIN)
    theirs = pickles.load_torch_file(legacy.first_file(str(FIXTURE / "torch" / "iter_0000010")))
    assert sorted(ours) == sorted(theirs)
    assert {k: getattr(v, "shape", v) for k, v in ours["model"].items()} == \
        {k: getattr(v, "shape", v) for k, v in theirs["model"].items()}
    _check_args(ours["args"])


def _check_args(args):
    """The entries Megatron-LM's load reads from the saved args."""
    for name, value in (("num_layers", 2), ("hidden_size", 64), ("num_attention_heads", 4),
                        ("add_position_embedding", True), ("max_position_embeddings", 64),
                        ("padded_vocab_size", 512), ("tensor_model_parallel_size", 1),
                        ("no_save_optim", True), ("no_save_rng", True)):
        assert getattr(args, name) == value, name
    assert args.layernorm_epsilon == args.norm_epsilon  # Megatron-Core's spelling is kept too


@needs_fixture
@pytest.mark.parametrize("fmt, check", [("torch_dist", _check_torch_dist), ("torch", _check_torch)])
def test_megatron_layout_save_matches_megatrons_checkpoint_and_reloads_exactly(tmp_path, fmt, check):
    save = str(tmp_path / "saved")
    flags = ["--save", save, "--save-interval", "11", "--ckpt-format", fmt, "--ckpt-megatron-lm-layout"]
    run = run_ckpt(1, FIXTURE_FLAGS + ["--load", str(FIXTURE / "torch_dist")] + flags, iters=11,
                   snapshots=("load", 11))
    assert_megatron_logits(run.snapshots["load"])
    check(os.path.join(save, "iter_0000011"))
    reloaded = run_ckpt(1, FIXTURE_FLAGS + ["--load", save], iters=11, snapshots=("load",)).snapshots["load"]
    trained = {k: v for k, v in run.snapshots[11].items() if not k.startswith("optimizer.")}
    assert sorted(trained) == sorted(k for k in reloaded if not k.startswith("optimizer."))
    for key, tensor in trained.items():
        assert torch.equal(tensor, reloaded[key]), key
