"""The reliability battery's own tests (the promises with no other home) and a check that
every test the battery names (tests/reliability/battery.py) exists."""

import ast
import os

import pytest

from tests.multirank import RankFailure
from tests.reliability.battery import BATTERY
from tests.training.gpt_runs import run_gpt

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _test_names(path):
    with open(os.path.join(REPO, path), encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_every_promise_names_tests_that_exist():
    assert sorted(BATTERY, key=lambda r: int(r[1:])) == [f"R{i}" for i in range(1, 22)]
    missing = []
    for r, (_, nodes) in BATTERY.items():
        assert nodes, r
        for node in nodes:
            path, _, name = node.partition("::")
            if not os.path.isfile(os.path.join(REPO, path)) or (name and name not in _test_names(path)):
                missing.append(f"{r}: {node}")
    assert not missing, missing


def test_R6_peer_death_is_reported_with_rank_iteration_and_phase(capfd):
    with pytest.raises(RankFailure):
        run_gpt(2, [], iters=4, setup="peer_dies")
    err = capfd.readouterr().err
    assert "rank 0 failed at iteration 2, phase forward-backward" in err, err[-3000:]
