"""Run pretrain_bert in-process on N gloo ranks and read the losses from its log lines."""

from __future__ import annotations

import contextlib
import io
import re
import sys
from typing import List, Tuple

from tests.multirank import run_on_ranks

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(100)] + [f"##p{i}" for i in range(23)]


def write_vocab(path) -> str:
    """A 128-token WordPiece vocabulary (no padding needed at TP <= 2)."""
    path.write_text("\n".join(VOCAB) + "\n")
    return str(path)


def tiny_bert(vocab_file: str) -> List[str]:
    return [
        "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "32", "--max-position-embeddings", "32",
        "--micro-batch-size", "2", "--global-batch-size", "8",
        "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "2",
        "--mock-data", "--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file", vocab_file,
        "--make-vocab-size-divisible-by", "64",
        "--log-interval", "1", "--eval-iters", "0",
        "--hidden-dropout", "0", "--attention-dropout", "0",
        "--use-cpu-initialization", "--num-workers", "0",
        "--distributed-backend", "gloo",
    ]


LM_LOSS = re.compile(r"lm loss: ([0-9.Ee+-]+|nan|inf)")
SOP_LOSS = re.compile(r"sop loss: ([0-9.Ee+-]+|nan|inf)")
GRAD_NORM = re.compile(r"grad norm: ([0-9.]+|nan|inf)")


def _run_pretrain(rank, world_size, argv):
    import pretrain_bert
    from megatron.core.transformer.enums import ModelType
    from megatron.training.flops import bert_floating_point_operations
    from megatron.training.training import pretrain

    recorded = []
    original = pretrain_bert.loss_func

    def recording_loss_func(*args):
        loss, report = original(*args)
        recorded.append(float(loss.detach()).hex())
        return loss, report

    pretrain_bert.loss_func = recording_loss_func
    sys.argv = ["pretrain_bert.py"] + list(argv)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        pretrain(pretrain_bert.train_valid_test_datasets_provider, pretrain_bert.model_provider,
                 ModelType.encoder_or_decoder, pretrain_bert.forward_step,
                 num_floating_point_operations_func=bert_floating_point_operations)
    return out.getvalue(), recorded


def run_bert(world_size: int, argv: List[str]) -> Tuple[str, List[str]]:
    """(the log printed by the last rank of a BERT run, that rank's micro-batch losses as
    float.hex in order)."""
    return run_on_ranks(_run_pretrain, world_size, args=(argv,), timeout=400)[-1]


def values(pattern: re.Pattern, log: str) -> List[float]:
    return [float(x) for x in pattern.findall(log)]
