"""HF export refuses attention sinks and the q/k L2 norm: no exported family has them, so
writing the checkpoint would silently drop them."""

import os
import sys

import pytest
import torch

from megatron.training.arguments import parse_args
from tests.tools.conftest import repo_root

sys.path.insert(0, os.path.join(repo_root(), "tools", "checkpoint"))

from hf_config import hf_config_from_args  # noqa: E402
from workers import ConversionError  # noqa: E402

LLAMA = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --max-position-embeddings 16 "
         "--swiglu --normalization RMSNorm --position-embedding-type rope --disable-bias-linear "
         "--untie-embeddings-and-output-weights ")


def test_plain_llama_exports():
    assert hf_config_from_args(parse_args(args=LLAMA.split()), 128, torch.float32)["model_type"] == "llama"


@pytest.mark.parametrize("extra, what", [
    ("--softmax-type learnable", "vanilla softmax"),
    ("--softmax-type off-by-one", "vanilla softmax"),
    ("--qk-l2-norm", "L2 norm"),
])
def test_attention_options_are_refused(extra, what):
    with pytest.raises(ConversionError, match=what):
        hf_config_from_args(parse_args(args=(LLAMA + extra).split()), 128, torch.float32)
