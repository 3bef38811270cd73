"""--deterministic-mode: two runs are bit-identical, the switches and environment Megatron
sets are set, and non-deterministic options are refused by name."""

import os

import pytest
import torch

from megatron.training.arguments import parse_and_validate
from megatron.training.deterministic import apply_deterministic
from tests.training.gpt_runs import grad_norms, losses, run_gpt_with_params

BASE = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
        "--max-position-embeddings 32 --micro-batch-size 2 --deterministic-mode").split()


def test_two_runs_are_bit_identical():
    extra = ["--deterministic-mode", "--seed", "7"]
    (log1, params1, _), (log2, params2, _) = (run_gpt_with_params(1, extra, iters=3) for _ in range(2))
    assert len(losses(log1)) == 3
    assert losses(log1) == losses(log2) and grad_norms(log1) == grad_norms(log2)
    assert params1[0].keys() == params2[0].keys()
    for name, value in params1[0].items():
        assert torch.equal(value, params2[0][name]), name


def test_flag_sets_torch_switches_and_environment(monkeypatch):
    for name in ("NCCL_ALGO", "CUBLAS_WORKSPACE_CONFIG", "NVTE_ALLOW_NONDETERMINISTIC_ALGO"):
        monkeypatch.delenv(name, raising=False)
    was = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic, \
        torch.backends.cudnn.benchmark
    try:
        apply_deterministic(parse_and_validate(BASE))
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["NCCL_ALGO"] == "Ring"
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert os.environ["NVTE_ALLOW_NONDETERMINISTIC_ALGO"] == "0"
    finally:
        torch.use_deterministic_algorithms(was[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = was[1], was[2]


def test_without_the_flag_nothing_is_touched(monkeypatch):
    monkeypatch.delenv("NCCL_ALGO", raising=False)
    apply_deterministic(parse_and_validate(BASE[:-1]))
    assert "NCCL_ALGO" not in os.environ and not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize("flag", ["--cross-entropy-loss-fusion"])
def test_non_deterministic_option_is_refused_by_name(flag):
    with pytest.raises(ValueError, match=rf"^{flag} cannot be combined with --deterministic-mode"):
        parse_and_validate(BASE + [flag])


def test_non_deterministic_nccl_algorithm_is_refused(monkeypatch):
    monkeypatch.setenv("NCCL_ALGO", "NVLS")
    with pytest.raises(ValueError, match="^NCCL_ALGO=NVLS cannot be combined with --deterministic-mode"):
        parse_and_validate(BASE)
    monkeypatch.setenv("NCCL_ALGO", "Tree")
    assert parse_and_validate(BASE).deterministic_mode
