"""Files the framework reads back with ``torch.load`` run no code from the file: a sharded
checkpoint's objects (common state, RNG states) and the converter's exported state go through
the weights-only loader, which refuses any global but tensors, plain containers, a Namespace
and NumPy arrays."""

import argparse
import os
import pickle

import numpy as np
import pytest
import torch

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedObject
from megatron.core.safe_unpickle import load_weights_only


class _RunsCode:
    """Unpickling this calls ``os.system`` (what a crafted file would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_object_in_a_sharded_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "ran"
    dist_checkpointing.save({"w": torch.ones(2), "common": ShardedObject("common", _RunsCode(marker))}, tmp_path / "ckpt")
    assert not marker.exists()
    # torch.distributed.checkpoint wraps the reader's error in its CheckpointException (a BaseException).
    with pytest.raises(BaseException, match=r"(posix|os)\.system"):
        dist_checkpointing.load({"w": torch.zeros(2), "common": ShardedObject("common")}, tmp_path / "ckpt")
    assert not marker.exists()


def test_own_objects_load(tmp_path):
    rng = {"args": argparse.Namespace(lr=1e-3, params_dtype=torch.bfloat16),
           "numpy": ("MT19937", np.arange(4, dtype=np.uint32), 2, 0, 0.0), "torch": torch.get_rng_state()}
    dist_checkpointing.save({"rng": ShardedObject("rng", rng)}, tmp_path)
    loaded = dist_checkpointing.load({"rng": ShardedObject("rng")}, tmp_path)["rng"]
    assert loaded["args"] == rng["args"] and np.array_equal(loaded["numpy"][1], rng["numpy"][1])


def test_exported_state_file_is_read_weights_only(tmp_path):
    marker, path = tmp_path / "ran", tmp_path / "exported_state.pt"
    torch.save({"model": {"w": torch.ones(2)}, "vocab_size": _RunsCode(marker)}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_weights_only(str(path))
    assert not marker.exists()


def test_crafted_dcp_metadata_is_refused(tmp_path):
    """torch.distributed.checkpoint's ``.metadata`` is a pickle too: opening the checkpoint
    reads it with the restricted unpickler."""
    marker = tmp_path / "ran"
    dist_checkpointing.save({"w": torch.ones(2)}, tmp_path / "ckpt")
    with open(tmp_path / "ckpt" / ".metadata", "wb") as handle:
        pickle.dump(_RunsCode(marker), handle)
    with pytest.raises(BaseException, match=r"(posix|os)\.system"):
        dist_checkpointing.load({"w": torch.zeros(2)}, tmp_path / "ckpt")
    assert not marker.exists()
