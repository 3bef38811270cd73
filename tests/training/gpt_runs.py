"""Run pretrain_gpt in-process on N gloo ranks and read the losses from its log lines."""

from __future__ import annotations

import contextlib
import io
import re
import sys
from typing import List

from tests.multirank import run_on_ranks

TINY_GPT = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "32", "--max-position-embeddings", "32",
    "--micro-batch-size", "2", "--global-batch-size", "8",
    "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "2",
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "512",
    "--log-interval", "1", "--eval-iters", "0",
    "--hidden-dropout", "0", "--attention-dropout", "0",
    "--use-cpu-initialization", "--num-workers", "0",
    "--distributed-backend", "gloo",
]

LOSS = re.compile(r"lm loss: ([0-9.Ee+-]+|nan|inf)")
GRAD_NORM = re.compile(r"grad norm: ([0-9.]+|nan|inf)")


def _break_row_parallel_reduction():
    """Make RowParallelLinear skip its tensor-parallel all-reduce (a planted bug)."""
    from megatron.core.tensor_parallel import layers

    layers.reduce_from_tensor_model_parallel_region = lambda x, group: x


def _run_pretrain(rank, world_size, argv, broken=False):
    import pretrain_gpt
    from megatron.core.transformer.enums import ModelType
    from megatron.training.training import pretrain

    if broken:
        _break_row_parallel_reduction()

    sys.argv = ["pretrain_gpt.py"] + list(argv)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        pretrain(pretrain_gpt.train_valid_test_datasets_provider, pretrain_gpt.model_provider,
                 ModelType.encoder_or_decoder, pretrain_gpt.forward_step)
    return out.getvalue()


def run_gpt(world_size: int, extra: List[str], iters: int = 10, broken: bool = False) -> str:
    """The log printed by the last rank of a tiny-GPT run (``broken``: with a planted bug)."""
    argv = TINY_GPT + ["--train-iters", str(iters)] + extra
    logs = run_on_ranks(_run_pretrain, world_size, args=(argv, broken), timeout=400)
    return logs[-1]


def losses(log: str) -> List[float]:
    return [float(x) for x in LOSS.findall(log)]


def grad_norms(log: str) -> List[float]:
    return [float(x) for x in GRAD_NORM.findall(log)]
