"""tools/checkpoint/convert.py --loader megatron / mcore reads checkpoints written by
Megatron-LM itself (either format) and reshards them."""

from __future__ import annotations

import os
import sys

import pytest

from tests.training.checkpointing.megatron_cases import FIXTURE, assert_megatron_logits, needs_fixture, read_full_tensors
from tests.tools.conftest import repo_root

sys.path.insert(0, os.path.join(repo_root(), "tools", "checkpoint"))

import convert  # noqa: E402


@needs_fixture
@pytest.mark.parametrize("loader, fmt", [("megatron", "torch"), ("mcore", "torch_dist")])
def test_convert_reads_megatron_lm_checkpoints(tmp_path, loader, fmt):
    """Megatron-LM's checkpoint -> ours in TP2 (torch_dist): the saved weights give
    Megatron's logits; the iteration is kept."""
    out = tmp_path / "converted"
    summary = convert.main(["--model-type", "GPT", "--loader", loader, "--saver", "core",
                            "--load-dir", str(FIXTURE / fmt), "--save-dir", str(out),
                            "--target-tensor-parallel-size", "2"])
    assert f"({fmt}, TP=1 PP=1 EP=1, iteration 10)" in summary
    assert_megatron_logits(read_full_tensors(str(out / "iter_0000010")))
