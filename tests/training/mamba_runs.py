"""Run pretrain_hybrid in-process on N gloo ranks and read the losses from its log lines."""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from typing import List

from tests.multirank import run_on_ranks
from tests.training.gpt_runs import TINY_GPT

# A tiny hybrid: Mamba, MLP, attention, Mamba (mixer: 8 heads of 16, 2 groups, state 8).
TINY_HYBRID = [a for a in TINY_GPT] + [
    "--hybrid-layer-pattern", "M-*M", "--num-layers", "4",
    "--mamba-state-dim", "8", "--mamba-head-dim", "16", "--mamba-num-groups", "2",
    "--position-embedding-type", "none", "--normalization", "RMSNorm", "--disable-bias-linear",
    "--untie-embeddings-and-output-weights",
]


def _run(rank, world_size, argv, log_records=False):
    import pretrain_hybrid
    from megatron.core.transformer.enums import ModelType
    from megatron.training.training import pretrain

    sys.argv = ["pretrain_hybrid.py"] + list(argv)
    out = io.StringIO()
    handler, root = logging.StreamHandler(out), logging.getLogger()
    level = root.level
    if log_records:
        # a handler on the root logger makes the run's basicConfig a no-op, its level too
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(out):
            pretrain(pretrain_hybrid.train_valid_test_datasets_provider, pretrain_hybrid.model_provider,
                     ModelType.encoder_or_decoder, pretrain_hybrid.forward_step,
                     args_defaults=pretrain_hybrid.HYBRID_DEFAULTS)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return out.getvalue()


def hybrid_argv(extra: List[str], iters: int = 8) -> List[str]:
    argv = [a for a in TINY_HYBRID]
    # --num-layers of the GPT base is replaced by the pattern's count.
    i = argv.index("--num-layers")
    del argv[i:i + 2]
    return argv + ["--train-iters", str(iters)] + extra


def run_hybrid(world_size: int, extra: List[str], iters: int = 8, log_records: bool = False) -> str:
    """The log printed by the last rank of a tiny-hybrid run (it logs the losses); with
    ``log_records``, rank 0's log records (start-up lines) before it."""
    logs = run_on_ranks(_run, world_size, args=(hybrid_argv(extra, iters), log_records), timeout=400)
    return logs[0] + logs[-1] if log_records and world_size > 1 else logs[-1]
