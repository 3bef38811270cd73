"""The torchrun multi-node recipe: two "nodes" on one host (DP=2 over gloo) train exactly
like one node with two processes."""

from __future__ import annotations

import sys

from tests.launch.recipe_runs import (
    EXAMPLES,
    TINY_OVERRIDES,
    failure_excerpt,
    finish,
    free_port,
    losses,
    recipe_env,
    start,
)

RECIPE = str(EXAMPLES / "pretrain_gpt_torchrun_multinode.sh")


def _recipe(nnodes: int, node_rank: int, nproc: int, port: int):
    env = recipe_env(NNODES=str(nnodes), NODE_RANK=str(node_rank), NPROC_PER_NODE=str(nproc),
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHON=sys.executable)
    return start(["bash", RECIPE, *TINY_OVERRIDES], env)


def test_two_nodes_train_like_one_node_with_two_processes():
    port = free_port()
    (rc0, log0), (rc1, log1) = finish([_recipe(2, 0, 1, port), _recipe(2, 1, 1, port)])
    assert rc0 == 0, failure_excerpt(log0)
    assert rc1 == 0, failure_excerpt(log1)
    # Megatron prints the iteration line on the last rank: global rank 1 lives on node 1.
    two_nodes = losses(log1)
    assert len(two_nodes) == 4, failure_excerpt(log1)
    assert "data parallel 2" in log0 + log1

    ((rc, log),) = finish([_recipe(1, 0, 2, free_port())])
    assert rc == 0, failure_excerpt(log)
    # Same ranks, same seeds, same gloo reductions: the split over nodes changes nothing,
    # so the printed losses agree to every printed digit.
    assert losses(log) == two_nodes
