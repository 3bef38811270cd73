"""--saver core (alias mcore, megatron): a Megatron checkpoint in the target layout.

--saver-ckpt-format torch_dist (the default) writes the layout-independent format, which
any TP/PP/EP loads; --saver-ckpt-format torch writes one mp_rank_* file per model-parallel
rank of the target layout (what Megatron-LM's converter always writes). Only the model is
kept, with its iteration and run arguments; optimizer and RNG states are dropped.
"""

from __future__ import annotations

import math
import os

import torch

from core_checkpoint import IMPORTED_ARCHITECTURE, open_core_checkpoint
from hf_files import read_weights
from reshard import TORCH, TORCH_DIST, layout_free, save_in_layout
from sources import CoreSource, HFSource
from workers import ConversionError, import_state_dict, run_workers


def add_arguments(parser) -> None:
    group = parser.add_argument_group("saver core")
    group.add_argument("--target-tensor-parallel-size", type=int, default=None,
                       help="Tensor-parallel size of the saved checkpoint (default: the source's, 1 for HF).")
    group.add_argument("--target-pipeline-parallel-size", type=int, default=None,
                       help="Pipeline-parallel size of the saved checkpoint (default: the source's, 1 for HF).")
    group.add_argument("--target-expert-parallel-size", type=int, default=None,
                       help="Expert-parallel size of the saved checkpoint (default: the source's, 1 for HF).")
    group.add_argument("--saver-ckpt-format", choices=(TORCH_DIST, TORCH), default=TORCH_DIST,
                       help="Format of the saved checkpoint. torch_dist (default) loads into any layout; torch "
                            "writes per-rank mp_rank_* files for the target layout, as Megatron-LM's converter "
                            "always does.")


def _target(args, default) -> tuple:
    sizes = (args.target_tensor_parallel_size, args.target_pipeline_parallel_size, args.target_expert_parallel_size)
    target = tuple(given if given is not None else fallback for given, fallback in zip(sizes, default))
    for flag, value in zip(("--target-tensor-parallel-size", "--target-pipeline-parallel-size",
                            "--target-expert-parallel-size"), target):
        if value < 1:
            raise ConversionError(f"{flag} {value}: must be at least 1")
    return target


def _check_empty(save_dir: str) -> None:
    if os.path.isdir(save_dir) and os.listdir(save_dir):
        raise ConversionError(f"--save-dir {save_dir} is not empty; converted checkpoints go into a new directory")


def save_checkpoint(source, args, workdir: str) -> str:
    _check_empty(args.save_dir)
    if isinstance(source, HFSource):
        target = _target(args, (1, 1, 1))
        _import_hf(source, args, workdir, target)
    elif isinstance(source, CoreSource):
        target = _target(args, source.checkpoint.layout)
        _reshard(source, args, workdir, target)
    else:
        raise ConversionError(f"--saver core cannot save a {type(source).__name__}")
    saved = open_core_checkpoint(args.save_dir)
    tp, pp, ep = target
    return f"{args.save_dir} ({args.saver_ckpt_format}, TP={tp} PP={pp} EP={ep}, iteration {saved.iteration})"


def _reshard(source: CoreSource, args, workdir: str, target: tuple) -> None:
    checkpoint = source.checkpoint
    if checkpoint.ckpt_format == TORCH and checkpoint.layout != target:
        checkpoint = layout_free(checkpoint, source.family, workdir)
    save_in_layout(checkpoint, source.family, args.save_dir, args.saver_ckpt_format, *target)


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.size(0) == rows:
        return tensor
    return torch.cat((tensor, tensor.new_zeros(rows - tensor.size(0), *tensor.shape[1:])))


def _import_hf(source: HFSource, args, workdir: str, target: tuple) -> None:
    """HF weights -> a single-rank model -> a checkpoint at iteration 0 (resharded when the
    torch format of another layout was asked for)."""
    from megatron.training.arguments import parse_args

    tp = target[0]
    vocab = int(source.config["vocab_size"])
    # Pad the vocabulary once, here, to a multiple of the target TP: the rows then split evenly.
    padded = math.ceil(vocab / tp) * tp
    state_dict = source.family.hf_to_core(read_weights(source.hf_dir), source.config)
    for key in ("embedding.word_embeddings.weight", "output_layer.weight", "output_layer.bias"):
        if key in state_dict:
            state_dict[key] = _pad_rows(state_dict[key], padded)
    state_path = os.path.join(workdir, "imported_state.pt")
    torch.save(state_dict, state_path)
    del state_dict
    direct = args.saver_ckpt_format == TORCH_DIST or target == (1, 1, 1)
    first_save = args.save_dir if direct else os.path.join(workdir, "imported")
    flags = source.family.hf_flags(source.config) + [
        "--padded-vocab-size", str(padded), "--micro-batch-size", "1", "--save-interval", "1", "--use-cpu-initialization",
        "--distributed-backend", "gloo", "--no-save-optim", "--no-save-rng", "--save", first_save,
        "--ckpt-format", args.saver_ckpt_format if direct else TORCH_DIST,
    ]
    run_args = parse_args(None, args=flags)
    setattr(run_args, IMPORTED_ARCHITECTURE, (source.config.get("architectures") or [None])[0])
    run_workers(import_state_dict, 1, run_args,
                {"model_provider": source.family.model_provider, "state_dict": state_path})
    if not direct:
        save_in_layout(open_core_checkpoint(first_save), source.family, args.save_dir, args.saver_ckpt_format, *target)
