"""Reading and writing Hugging Face model directories: ``config.json`` and safetensors
weights (one ``model.safetensors`` or shards listed in ``model.safetensors.index.json``)."""

from __future__ import annotations

import json
import os
from typing import Dict

import torch

from workers import ConversionError

CONFIG = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def read_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, CONFIG)
    if not os.path.isdir(hf_dir):
        raise ConversionError(f"--load-dir {hf_dir}: no such directory")
    if not os.path.isfile(path):
        raise ConversionError(f"--load-dir {hf_dir} has no {CONFIG}: with --loader hf it must be a Hugging Face "
                              "model directory (as written by save_pretrained)")
    with open(path) as handle:
        return json.load(handle)


def read_weights(hf_dir: str) -> Dict[str, torch.Tensor]:
    """Every tensor of the model's safetensors files, by HF name."""
    from safetensors.torch import load_file

    index = os.path.join(hf_dir, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as handle:
            files = sorted(set(json.load(handle)["weight_map"].values()))
    elif os.path.isfile(os.path.join(hf_dir, SINGLE_FILE)):
        files = [SINGLE_FILE]
    else:
        raise ConversionError(f"--load-dir {hf_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}; save the model with "
                              "save_pretrained(..., safe_serialization=True)")
    weights: Dict[str, torch.Tensor] = {}
    for name in files:
        weights.update(load_file(os.path.join(hf_dir, name)))
    return weights


def write_model(hf_dir: str, config: dict, weights: Dict[str, torch.Tensor]) -> None:
    """``config.json`` and one ``model.safetensors`` (contiguous, unshared tensors)."""
    from safetensors.torch import save_file

    from megatron.core.durable_files import default_file_mode

    os.makedirs(hf_dir, exist_ok=True)
    tensors = {name: tensor.detach().contiguous().clone() for name, tensor in weights.items()}
    save_file(tensors, os.path.join(hf_dir, SINGLE_FILE), metadata={"format": "pt"})
    os.chmod(os.path.join(hf_dir, SINGLE_FILE), default_file_mode())  # safetensors creates it 0600
    with open(os.path.join(hf_dir, CONFIG), "w") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
        handle.write("\n")
