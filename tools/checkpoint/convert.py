"""Offline checkpoint conversion: reshard a Megatron checkpoint to another TP/PP/EP layout
or format, import a Hugging Face model, or export to Hugging Face.

    python tools/checkpoint/convert.py --model-type GPT --loader core --saver core \\
        --load-dir A --save-dir B --target-tensor-parallel-size 2 --target-pipeline-parallel-size 2
    python tools/checkpoint/convert.py --model-type GPT --loader hf --saver core --load-dir HF --save-dir B
    python tools/checkpoint/convert.py --model-type GPT --loader core --saver hf --load-dir A --save-dir HF

A loader (module ``loader_<name>`` next to this file or on PYTHONPATH) turns --load-dir into
a source; a saver (``saver_<name>``) writes it to --save-dir. Each provides
``add_arguments(parser)``; loaders ``load_checkpoint(args, workdir)``, savers
``save_checkpoint(source, args, workdir)``. The model weights and the iteration are kept;
optimizer and RNG states are dropped, as with Megatron-LM's converter.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
from typing import List, Optional

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(os.path.dirname(_HERE))
for _path in (_HERE, _REPO):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from workers import ConversionError  # noqa: E402

ALIASES = {"mcore": "core", "megatron": "core"}
BUILTIN = ("core", "hf")


def _base_parser(add_help: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Convert checkpoints between parallel layouts, formats and Hugging Face. Only the model "
                    "weights, the iteration and the run arguments are kept; optimizer and RNG states are dropped.",
        add_help=add_help, allow_abbrev=False)
    parser.add_argument("--model-type", required=True,
                        help="Model family: GPT, BERT or Mamba (hybrid models; T5: not supported yet).")
    parser.add_argument("--loader", default="core", help="Source kind: core (alias mcore, megatron) or hf.")
    parser.add_argument("--saver", default="core", help="Target kind: core (alias mcore, megatron) or hf.")
    parser.add_argument("--load-dir", required=True, help="Checkpoint root (--save of a run) or Hugging Face directory.")
    parser.add_argument("--save-dir", required=True, help="New directory for the converted checkpoint.")
    parser.add_argument("--true-vocab-size", type=int, default=None,
                        help="Vocabulary size without padding, for the exported embedding (default: the saved "
                             "run's tokenizer).")
    parser.add_argument("--megatron-path", default=None, help="Directory holding the megatron package, if not this one.")
    return parser


def _plugin(kind: str, name: str):
    name = ALIASES.get(name, name)
    for module in (f"{kind}_{name}", name):
        try:
            found = importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module:
                raise
            continue
        if hasattr(found, "add_arguments") and hasattr(found, f"{'load' if kind == 'loader' else 'save'}_checkpoint"):
            return found
    raise ConversionError(f"--{kind} {name}: no module {kind}_{name} found; available: {', '.join(BUILTIN)} "
                          "(aliases mcore, megatron -> core)")


def parse(argv: Optional[List[str]]):
    known, _ = _base_parser(add_help=False).parse_known_args(argv)
    if known.megatron_path:
        sys.path.insert(0, known.megatron_path)
    loader, saver = _plugin("loader", known.loader), _plugin("saver", known.saver)
    parser = _base_parser(add_help=True)
    loader.add_arguments(parser)
    saver.add_arguments(parser)
    return parser.parse_args(argv), loader, saver


def _help_requested(argv: List[str]) -> bool:
    return "-h" in argv or "--help" in argv


def main(argv: Optional[List[str]] = None) -> str:
    """Run one conversion; returns the summary line it prints."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if _help_requested(argv):
        # Show every plugin's flags without requiring the others.
        parser = _base_parser(add_help=True)
        for kind, name in (("loader", "core"), ("loader", "hf"), ("saver", "core"), ("saver", "hf")):
            _plugin(kind, name).add_arguments(parser)
        parser.parse_args(argv)
    args, loader, saver = parse(argv)
    from families import family

    family(args.model_type)
    start = time.time()
    parent = os.path.dirname(os.path.abspath(args.save_dir))
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="convert-", dir=parent) as work:
        source = loader.load_checkpoint(args, work)
        target = saver.save_checkpoint(source, args, work)
    summary = (f"converted {args.model_type} {source.describe()} -> {target}; optimizer and RNG states dropped; "
               f"{time.time() - start:.1f} s")
    print(summary)
    return summary


def cli() -> int:
    """The command line (also the ``megatron-convert-checkpoint`` command): exit status 0, or 1
    with the message of a conversion error."""
    try:
        main()
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
