"""Command-line rules of context parallelism fail fast with the flag named, and the
parsed flags reach TransformerConfig; the batch split keeps chunks i and 2CP-1-i."""

import pytest
import torch

from megatron.training.arguments import parse_and_validate
from megatron.training.config_from_args import core_transformer_config_from_args

BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--max-position-embeddings", "32", "--micro-batch-size", "1", "--mock-data",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "512", "--attention-dropout", "0"]


def _parse(extra, world=4):
    return parse_and_validate(BASE + extra, world_size=world)


@pytest.mark.parametrize(
    "extra, flag",
    [
        (["--context-parallel-size", "4", "--seq-length", "36", "--max-position-embeddings", "36"], "--seq-length"),
        (["--context-parallel-size", "4", "--cp-comm-type", "ring"], "--cp-comm-type"),
        (["--context-parallel-size", "4", "--cp-comm-type", "a2a+p2p"], "--cp-comm-type"),
        (["--context-parallel-size", "4", "--cp-comm-type", "a2a+p2p", "--hierarchical-context-parallel-sizes", "2", "3"],
         "--hierarchical-context-parallel-sizes"),
        (["--context-parallel-size", "4", "--cp-comm-type", "a2a", "--num-attention-heads", "2"], "--num-attention-heads"),
        (["--context-parallel-size", "2", "--reset-attention-mask"], "--reset-attention-mask"),
    ],
    ids=["seq-not-multiple", "unknown-type", "a2a+p2p-no-sizes", "sizes-product", "a2a-heads", "reset-mask"],
)
def test_context_parallel_rules(extra, flag):
    with pytest.raises(ValueError, match=flag):
        _parse(extra)


def test_flags_reach_transformer_config():
    args = _parse(["--context-parallel-size", "4", "--cp-comm-type", "a2a+p2p",
                   "--hierarchical-context-parallel-sizes", "2", "2"])
    config = core_transformer_config_from_args(args)
    assert config.cp_comm_type == ["a2a+p2p"]
    assert config.hierarchical_context_parallel_sizes == [2, 2]


def test_load_balanced_batch_split():
    from megatron.core.transformer.context_parallel.layout import load_balanced_indices

    # seq 16 at CP=4: chunks of 2; rank 1 holds chunks 1 and 6.
    assert load_balanced_indices(16, 1, 4).tolist() == [2, 3, 12, 13]
    covered = torch.cat([load_balanced_indices(16, r, 4) for r in range(4)]).sort().values
    assert covered.tolist() == list(range(16))
