"""--saver hf: a Hugging Face causal-LM directory (``config.json`` + ``model.safetensors``)
that ``transformers.AutoModelForCausalLM.from_pretrained`` loads.

The checkpoint is loaded into a single-rank model by the training code (a torch_dist
checkpoint reshards on load; a torch-format one of another layout is first rewritten as
torch_dist by a run of its own layout), mapped with ``megatron_to_hf``, and the padded
vocabulary rows are trimmed to --true-vocab-size (default: the saved run's tokenizer).
"""

from __future__ import annotations

import os

import torch

from core_checkpoint import worker_args
from bert_family import ARCHITECTURES as BERT_ARCHITECTURES
from hf_config import HF_MODEL_TYPES
from hf_files import write_model
from reshard import TORCH, layout_free
from sources import CoreSource
from workers import ConversionError, export_state_dict, run_workers

from megatron.core.safe_unpickle import load_weights_only

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(parser) -> None:
    group = parser.add_argument_group("saver hf")
    group.add_argument("--hf-dtype", choices=tuple(DTYPES), default=None,
                       help="dtype of the exported weights (default: bfloat16 for a --bf16 run, float16 for "
                            "--fp16, else float32).")
    group.add_argument("--hf-model-type", choices=HF_MODEL_TYPES + BERT_ARCHITECTURES, default=None,
                       help="Force the Hugging Face family instead of deriving it from the saved run's flags.")


def _dtype(args, saved_args) -> torch.dtype:
    if args.hf_dtype:
        return DTYPES[args.hf_dtype]
    if getattr(saved_args, "bf16", False):
        return torch.bfloat16
    return torch.float16 if getattr(saved_args, "fp16", False) else torch.float32


def _trim_vocab(state_dict: dict, vocab: int) -> None:
    for key in ("embedding.word_embeddings.weight", "output_layer.weight", "output_layer.bias"):
        if key in state_dict:
            if state_dict[key].size(0) < vocab:
                raise ConversionError(f"--true-vocab-size {vocab} exceeds the checkpoint's "
                                      f"{state_dict[key].size(0)} embedding rows")
            state_dict[key] = state_dict[key][:vocab]


def save_checkpoint(source, args, workdir: str) -> str:
    if not isinstance(source, CoreSource):
        raise ConversionError("--saver hf exports Megatron checkpoints: use --loader core (a Hugging Face source "
                              "needs no conversion to Hugging Face)")
    model_family = source.family
    if model_family.core_to_hf is None:
        raise ConversionError(f"--saver hf: Hugging Face export of --model-type {model_family.name} is not supported yet")
    if os.path.isfile(os.path.join(args.save_dir, "config.json")):
        raise ConversionError(f"--save-dir {args.save_dir} already holds a Hugging Face model; choose a new directory")
    checkpoint = source.checkpoint
    if checkpoint.ckpt_format == TORCH and checkpoint.layout != (1, 1, 1):
        checkpoint = layout_free(checkpoint, model_family, workdir)
    exported = os.path.join(workdir, "exported_state.pt")
    run_args = worker_args(checkpoint.args, load=checkpoint.root, save=None, ckpt_format=checkpoint.ckpt_format,
                           tp=1, pp=1, ep=1)
    run_workers(export_state_dict, 1, run_args, {"model_provider": model_family.model_provider, "output": exported})
    result = load_weights_only(exported)
    vocab = args.true_vocab_size or result["vocab_size"]
    _trim_vocab(result["model"], vocab)
    dtype = _dtype(args, checkpoint.args)
    weights, config = model_family.core_to_hf(result["model"], checkpoint.args, args.hf_model_type, dtype, vocab)
    write_model(args.save_dir, config, weights)
    if model_family.write_tokenizer is not None:
        model_family.write_tokenizer(args.save_dir, checkpoint.args)
    return f"{args.save_dir} (Hugging Face {config['model_type']}, {config['torch_dtype']}, vocabulary {vocab})"
