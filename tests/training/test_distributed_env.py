"""Reading torchrun's and slurm's environment."""

import pytest

from megatron.training.distributed_env import _first_slurm_host, detect_distributed_env


@pytest.fixture
def clean_env(monkeypatch):
    for name in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
                 "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_NODELIST"]:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_torchrun(clean_env):
    clean_env.setenv("RANK", "3")
    clean_env.setenv("WORLD_SIZE", "8")
    clean_env.setenv("LOCAL_RANK", "3")
    clean_env.setenv("MASTER_ADDR", "node1")
    clean_env.setenv("MASTER_PORT", "1234")
    env = detect_distributed_env()
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.launcher) == (
        3, 8, 3, "node1", 1234, "torchrun")


def test_slurm(clean_env):
    clean_env.setenv("SLURM_PROCID", "9")
    clean_env.setenv("SLURM_NTASKS", "16")
    clean_env.setenv("SLURM_LOCALID", "1")
    clean_env.setenv("SLURM_JOB_NODELIST", "gpu[003-005,010]")
    env = detect_distributed_env()
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.launcher) == (
        9, 16, 1, "gpu003", 6000, "slurm")


def test_single_process(clean_env):
    env = detect_distributed_env()
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single")


@pytest.mark.parametrize("nodes, first", [("a01", "a01"), ("a[7-9]", "a7"), ("x[1,3],y2", "x1")])
def test_first_slurm_host(nodes, first):
    assert _first_slurm_host(nodes) == first


def test_bad_rank_is_named(clean_env):
    clean_env.setenv("RANK", "zero")
    clean_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="RANK='zero'"):
        detect_distributed_env()
