"""--log-params-norm: the iteration line's "params norm" is the norm of the whole model's
weights, the same on every layout (each weight counted once over tensor, pipeline and data
parallel ranks), and it follows the weights the optimizer just wrote."""

from __future__ import annotations

import re

import pytest
import torch

from megatron.training.params_norm import params_l2_norm
from tests.training.gpt_runs import losses, run_gpt

PARAMS_NORM = re.compile(r"params norm: ([0-9.]+)")
LAYERS = ["--num-layers", "4", "--log-params-norm"]


def _norms(log: str):
    return [float(x) for x in PARAMS_NORM.findall(log)]


@pytest.fixture(scope="module")
def reference():
    return _norms(run_gpt(1, LAYERS, iters=3))


def test_one_process_norm_moves_with_training(reference):
    assert len(reference) == 3
    assert reference[2] != reference[0]  # printed after each step: the updated weights (lr warms up from 0)


@pytest.mark.parametrize("world, extra", [
    (2, ["--tensor-model-parallel-size", "2"]),
    (2, ["--pipeline-model-parallel-size", "2"]),
    (2, ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"]),
], ids=["tp2", "pp2-tied-embeddings", "dp2-distopt-overlap-param-gather"])
def test_every_layout_reports_the_one_process_norm(reference, world, extra):
    log = run_gpt(world, LAYERS + extra, iters=3)
    got = _norms(log)
    assert len(got) == 3 and len(losses(log)) == 3
    # Printed with 3 decimals; the layouts' weights agree to ~1e-6 relative.
    assert got == pytest.approx(reference, abs=1.5e-3), (got, reference)


def test_norm_of_a_module_counts_each_weight_once(monkeypatch):
    """One process: the norm of every parameter, shared copies (``shared=True``) left out."""
    from megatron.core import process_groups

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    shared = torch.nn.Parameter(torch.ones(5))
    shared.shared = True
    model.register_parameter("tied_copy", shared)
    expected = torch.cat([p.detach().flatten() for name, p in model.named_parameters() if name != "tied_copy"]).norm()
    assert params_l2_norm([model], process_groups.resolve(None)) == pytest.approx(float(expected), rel=1e-6)
