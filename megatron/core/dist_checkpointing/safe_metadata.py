"""Reading torch.distributed.checkpoint's ``.metadata`` without running code from it.

The stock ``FileSystemReader`` unpickles ``.metadata`` with ``pickle.load``: a crafted file
in a checkpoint directory would run code when the checkpoint is opened. ``SafeMetadataReader``
reads it with ``megatron.core.safe_unpickle``, allowing only the classes the format uses.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Dict

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint import planner as dcp_planner

from megatron.core.safe_unpickle import TORCH_TENSORS, Name, restricted_loads

_DCP_CLASSES = {
    dcp_metadata: ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                   "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING"),
    dcp_planner: ("SavePlan", "TensorWriteData", "WriteItem", "WriteItemType"),
    dcp_filesystem: ("_StorageInfo",),
}
DCP_METADATA_ALLOWED: Dict[Name, Any] = {
    (module.__name__, name): getattr(module, name)
    for module, names in _DCP_CLASSES.items() for name in names if hasattr(module, name)
}
DCP_METADATA_ALLOWED.update(TORCH_TENSORS)
DCP_METADATA_ALLOWED[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
# the checkpoint id (a path) in the storage metadata of newer torch versions
DCP_METADATA_ALLOWED[("pathlib", "PosixPath")] = pathlib.PurePosixPath
DCP_METADATA_ALLOWED[("pathlib", "WindowsPath")] = pathlib.PureWindowsPath


class SafeMetadataReader(FileSystemReader):
    """``FileSystemReader`` that reads ``.metadata`` with the restricted unpickler (the
    stock reader calls ``pickle.load`` on it). Tensor data torch loads with weights_only."""

    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        path = os.path.join(str(self.path), ".metadata")
        with open(path, "rb") as handle:
            metadata = restricted_loads(handle, DCP_METADATA_ALLOWED, source=path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
