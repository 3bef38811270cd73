"""The dataset blend(s) named on the command line (megatron-facts section 3.1)."""

from __future__ import annotations

import argparse
import json
from typing import List, Optional, Tuple

from megatron.core.datasets.blend_spec import Blend, get_blend_from_list
from megatron.training.derived_args import DEFAULT_SPLIT

_SPLIT_KEYS = ("train", "valid", "test")


def _read_tokens(path: str, flag: str) -> List[str]:
    try:
        with open(path, "r", encoding="utf-8") as f:
            return f.read().split()
    except OSError as err:
        raise ValueError(f"{flag} {path!r} cannot be read ({err.strerror}); give an existing file") from err


def _per_split_from_json(path: str) -> List[Optional[Blend]]:
    try:
        with open(path, "r", encoding="utf-8") as f:
            spec = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(
            f"--per-split-data-args-path {path!r} is not a readable JSON file ({err}); it must hold "
            '{"train": ..., "valid": ..., "test": ...}'
        ) from err
    if not isinstance(spec, dict) or not set(spec) <= set(_SPLIT_KEYS):
        raise ValueError(
            f"--per-split-data-args-path {path!r} must be a JSON object with keys among {list(_SPLIT_KEYS)}"
        )
    blends = []
    for key in _SPLIT_KEYS:
        value = spec.get(key)
        tokens = value.split() if isinstance(value, str) else value
        blends.append(get_blend_from_list(tokens))
    return blends


def get_blend_and_blend_per_split(args: argparse.Namespace) -> Tuple[Optional[Blend], Optional[List[Optional[Blend]]]]:
    """(blend, blend_per_split) from --data-path / --data-args-path or the per-split flags."""
    use_data_path = args.data_path is not None or args.data_args_path is not None
    use_per_split = args.per_split_data_args_path is not None or any(
        getattr(args, f"{key}_data_path", None) is not None for key in _SPLIT_KEYS
    )
    if use_data_path and use_per_split:
        raise ValueError("--data-path cannot be combined with per-split data paths; give one or the other")
    blend, blend_per_split = None, None
    if use_data_path:
        if args.data_path is not None:
            blend = get_blend_from_list(args.data_path)
        else:
            blend = get_blend_from_list(_read_tokens(args.data_args_path, "--data-args-path"))
    elif use_per_split:
        if args.per_split_data_args_path is not None:
            blend_per_split = _per_split_from_json(args.per_split_data_args_path)
        else:
            blend_per_split = [get_blend_from_list(getattr(args, f"{key}_data_path", None)) for key in _SPLIT_KEYS]
    return blend, blend_per_split


def dataset_config_kwargs(args: argparse.Namespace, tokenizer) -> dict:
    """The ``BlendedMegatronDatasetConfig`` fields every family's datasets share, from the
    command line: seed, sequence length, the blend(s) (none with --mock-data), split, cache
    and build settings. A family adds its own fields (GPT's masks, BERT's masking)."""
    blend, blend_per_split = (None, None) if args.mock_data else get_blend_and_blend_per_split(args)
    if not args.mock_data and blend is None and blend_per_split is None:
        # Checked here, where a family's datasets are built, rather than in validation: the
        # text-generation server, checkpoint conversion and --dry-run read no data at all.
        raise ValueError(
            "no training data named: give --data-path (or --data-args-path, the per-split "
            "--train-data-path/--valid-data-path/--test-data-path, --per-split-data-args-path), "
            "or --mock-data to train on synthetic tokens"
        )
    return dict(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=None if blend is None else (args.split or DEFAULT_SPLIT),
        num_dataset_builder_threads=args.num_dataset_builder_threads,
        path_to_cache=args.data_cache_path,
        mmap_bin_files=args.mmap_bin_files,
        tokenizer=tokenizer,
        mid_level_dataset_surplus=args.mid_level_dataset_surplus,
        multiple_validation_sets=args.multiple_validation_sets,
        full_validation=args.full_validation,
    )
