"""--loader hf: a Hugging Face causal-LM directory (``config.json`` and ``model.safetensors``
or sharded safetensors with ``model.safetensors.index.json``)."""

from __future__ import annotations

from families import family
from hf_files import read_config
from sources import HFSource
from workers import ConversionError


def add_arguments(parser) -> None:
    pass


def load_checkpoint(args, workdir: str) -> HFSource:
    model_family = family(args.model_type)
    config = read_config(args.load_dir)
    if model_family.hf_flags is None:
        raise ConversionError(f"--loader hf: Hugging Face import of --model-type {args.model_type} is not supported yet")
    return HFSource(args.load_dir, config, model_family)
