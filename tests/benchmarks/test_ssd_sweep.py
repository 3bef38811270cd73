"""benchmarks/ssd_sweep.py without a GPU: it says so and exits 2 instead of failing."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import ssd_sweep  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU path is the benchmark itself")
def test_without_cuda_it_exits_2_with_a_message(capsys):
    assert ssd_sweep.main(["--repeats", "1"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
