"""Reading the pickles inside Megatron-LM checkpoints without running code from them.

Megatron-LM pickles its run arguments (an ``argparse.Namespace`` holding Megatron's own
enums, ``signal.Signals`` and torch dtypes) into ``model_optim_rng.pt``, ``common.pt`` and
the ``common_state`` entry of torch_dist files, and torch.distributed.checkpoint pickles its
``.metadata``. All of them are read with ``megatron.core.safe_unpickle``: harmless names
map to the real classes, every ``megatron.*`` / ``transformer_engine.*`` name to a
recording stand-in (its module is never imported), and anything else is refused.
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import signal
from typing import Any, Dict, Optional

from torch.distributed.checkpoint import metadata as dcp_metadata

from megatron.core.dist_checkpointing.safe_metadata import DCP_METADATA_ALLOWED, SafeMetadataReader  # noqa: F401
from megatron.core.safe_unpickle import Name, recorded_class, restricted_torch_load

# Packages whose classes appear in Megatron's pickled args; they stand in as records.
STAND_IN_PACKAGES = ("megatron.", "transformer_engine.", "modelopt.")

ARGS_ALLOWED: Dict[Name, Any] = {
    ("argparse", "Namespace"): argparse.Namespace,
    ("signal", "Signals"): signal.Signals,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("pathlib", "PosixPath"): pathlib.PurePosixPath,
    ("pathlib", "WindowsPath"): pathlib.PureWindowsPath,
}

def megatron_stand_in(module: str, name: str) -> Optional[type]:
    """A recording stand-in for a class of Megatron-LM (or its optional packages)."""
    if module.startswith(STAND_IN_PACKAGES):
        return recorded_class(module, name)
    return None


def load_torch_file(path: str) -> Any:
    """A ``torch.save`` file of a Megatron-LM checkpoint (``model_optim_rng.pt``, ``common.pt``)."""
    return restricted_torch_load(path, ARGS_ALLOWED, megatron_stand_in, source=path)


def load_torch_bytes(data: bytes, source: str) -> Any:
    """One ``torch.save``-serialized object of a distcp file (``common_state``, say)."""
    return restricted_torch_load(data, ARGS_ALLOWED, megatron_stand_in, source=source)


def read_object(directory: str, metadata: dcp_metadata.Metadata, key: str) -> Any:
    """The value of the byte entry ``key`` (a ShardedObject) of a distcp checkpoint,
    read straight from its file slice."""
    index = dcp_metadata.MetadataIndex(key)
    info = metadata.storage_data.get(index)
    if info is None:
        raise KeyError(key)
    if info.transform_descriptors:
        raise ValueError(f"{directory}: entry {key} is stored with transforms {info.transform_descriptors}, "
                         "which this reader does not undo")
    path = os.path.join(directory, info.relative_path)
    with open(path, "rb") as handle:
        handle.seek(info.offset)
        data = handle.read(info.length)
    return load_torch_bytes(data, f"{path} ({key})")
