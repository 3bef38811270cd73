"""The torchrun multi-node recipe on GPUs: two "nodes" on one host, each seeing half of the
GPUs (CUDA_VISIBLE_DEVICES), train like one node with all of them, over NCCL.

Node 0 gets GPUs 0..n/2-1, node 1 the rest; the recipe's NPROC_PER_NODE default (the GPUs the
node sees) starts n/2 processes on each, so the run is data parallel over n ranks across two
rendezvous-joined torchrun agents, as on two machines. The one-node run starts n processes.
fp32 with TF32 off: the two runs differ only in how NCCL orders the sums between processes
that see different devices, so the losses agree to the parity tests' 1e-4 (a rank that
trained on the wrong samples or skipped the gradient reduction is off by far more).
"""

from __future__ import annotations

import sys

import pytest
import torch

from tests.gpu_parallel.launch import environment
from tests.launch.recipe_runs import EXAMPLES, TINY_OVERRIDES, failure_excerpt, finish, free_port, losses, start

RECIPE = str(EXAMPLES / "pretrain_gpt_torchrun_multinode.sh")
LOSS_RTOL = 1e-4
# The CPU recipe test's tiny model, on NCCL: every option but the gloo backend.
GPU_OVERRIDES = [flag for flag in TINY_OVERRIDES if flag not in ("--distributed-backend", "gloo")]
ITERS = 4


def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _recipe(nnodes: int, node_rank: int, port: int, devices: list[int]):
    env = environment({
        "NNODES": str(nnodes), "NODE_RANK": str(node_rank), "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port), "PYTHON": sys.executable, "PRECISION": "fp32",
        "NVIDIA_TF32_OVERRIDE": "0", "CUDA_VISIBLE_DEVICES": ",".join(map(str, devices)),
    })
    env.pop("NPROC_PER_NODE", None)  # the recipe's default: one process per visible GPU
    return start(["bash", RECIPE, *GPU_OVERRIDES], env)


@pytest.mark.gpu
@pytest.mark.skipif(_gpus() < 2 or _gpus() % 2, reason=f"needs an even number >= 2 of GPUs, {_gpus()} visible")
def test_two_gpu_nodes_train_like_one_node():
    n = _gpus()
    half = n // 2
    port = free_port()
    (rc0, log0), (rc1, log1) = finish([_recipe(2, 0, port, list(range(half))),
                                       _recipe(2, 1, port, list(range(half, n)))])
    assert rc0 == 0, failure_excerpt(log0)
    assert rc1 == 0, failure_excerpt(log1)
    assert f"data parallel {n}" in log0 + log1, failure_excerpt(log0)
    # Megatron prints the iteration line on the last rank, which lives on node 1.
    two_nodes = losses(log1)
    assert len(two_nodes) == ITERS, failure_excerpt(log1)

    ((rc, log),) = finish([_recipe(1, 0, free_port(), list(range(n)))])
    assert rc == 0, failure_excerpt(log)
    one_node = losses(log)
    assert len(one_node) == ITERS, failure_excerpt(log)
    for i, (x, y) in enumerate(zip(two_nodes, one_node), start=1):
        assert abs(x - y) <= LOSS_RTOL * abs(y), f"iteration {i}: two nodes {x} vs one node {y}"
