"""``manifest.json``: what a checkpoint is and how to check that its files are whole.

Written by rank 0 into the staging directory after every rank's files are durable and
before the commit: format version, checkpoint format, iteration, the saving run's
parallel layout, framework and torch versions, and per file its size and CRC-32. Loading
verifies every file (the work split over the ranks) before any tensor is read, so a
truncated, corrupted or missing file is reported by name instead of loading garbage.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from typing import Dict, List, Optional

import torch

from megatron.core.durable_files import atomic_write
from megatron.training.checkpointing.directory import CheckpointError

MANIFEST_FILENAME = "manifest.json"
MANIFEST_VERSION = 1
_CHUNK = 16 * 1024 * 1024


def file_checksum(path: str) -> Dict[str, int]:
    crc, size = 0, 0
    with open(path, "rb") as handle:
        while True:
            block = handle.read(_CHUNK)
            if not block:
                break
            crc = zlib.crc32(block, crc)
            size += len(block)
    return {"size": size, "crc32": crc}


def checksums(directory: str, names: List[str]) -> Dict[str, Dict[str, int]]:
    return {name: file_checksum(os.path.join(directory, name)) for name in names}


def framework_version() -> str:
    try:
        from importlib.metadata import version

        return version("megatron-lm-open")
    except Exception:  # noqa: BLE001 -- not installed as a package (a source checkout)
        return "source"


# The manifest's "key_layout" of a checkpoint written in Megatron-LM's layout.
MEGATRON_LM_KEY_LAYOUT = "megatron-lm"


def write_manifest(directory: str, ckpt_format: str, iteration: int, layout: dict,
                   files: Dict[str, Dict[str, int]], key_layout: Optional[str] = None) -> None:
    """``key_layout``: MEGATRON_LM_KEY_LAYOUT for a checkpoint written in Megatron-LM's key
    layout (--ckpt-megatron-lm-layout), which loading then reads as Megatron-LM's."""
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "ckpt_format": ckpt_format,
        "iteration": iteration,
        "layout": layout,
        "framework_version": framework_version(),
        "torch_version": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": dict(sorted(files.items())),
    }
    if key_layout is not None:
        manifest["key_layout"] = key_layout
    data = json.dumps(manifest, indent=1).encode("utf-8")
    atomic_write(os.path.join(directory, MANIFEST_FILENAME), lambda handle: handle.write(data))


def read_manifest(directory: str) -> Optional[dict]:
    """The manifest, or None for a checkpoint without one (written by Megatron-LM)."""
    path = os.path.join(directory, MANIFEST_FILENAME)
    if not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as handle:
            manifest = json.loads(handle.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is unreadable ({error}); the checkpoint is damaged: load an earlier "
                              "iteration with --ckpt-step N") from error
    if manifest.get("manifest_version") != MANIFEST_VERSION or "files" not in manifest:
        raise CheckpointError(f"{path}: unknown manifest version {manifest.get('manifest_version')!r}; "
                              f"this build reads version {MANIFEST_VERSION}")
    return manifest


def verify_files(directory: str, manifest: dict, rank: int = 0, world: int = 1) -> List[str]:
    """Problems with this rank's share of the manifest's files (every ``world``-th file)."""
    problems = []
    for index, (name, expected) in enumerate(sorted(manifest["files"].items())):
        if index % world != rank:
            continue
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            problems.append(f"{path} is missing")
            continue
        size = os.path.getsize(path)
        if size != expected["size"]:
            problems.append(f"{path} has {size} bytes, the manifest says {expected['size']} (truncated or overwritten)")
            continue
        if file_checksum(path)["crc32"] != expected["crc32"]:
            problems.append(f"{path} fails its CRC-32 check (corrupted)")
    return problems
