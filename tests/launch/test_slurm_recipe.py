"""The slurm batch script, run on one host with stand-ins for srun and scontrol that start
the tasks locally with the SLURM_* variables a real job step gives them: both launch styles
(one task per GPU, one torchrun per node) train the same tiny GPT to the same losses."""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch.recipe_runs import (
    EXAMPLES,
    REPO,
    TINY_OVERRIDES,
    failure_excerpt,
    finish,
    free_port,
    losses,
    recipe_env,
    start,
)

SBATCH = EXAMPLES / "pretrain_gpt.sbatch"
FAKE_SLURM = Path(__file__).resolve().parent / "fake_slurm"


def _fake_slurm_bin(directory: Path) -> Path:
    """The stand-ins, copied and made executable (a checkout may drop the mode bits)."""
    directory.mkdir()
    for name in ("srun", "scontrol"):
        target = directory / name
        shutil.copy(FAKE_SLURM / name, target)
        target.chmod(target.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return directory


def _submit(tmp_path: Path, launch: str) -> list:
    """Run the batch script as slurm would on a 2-node x 1-GPU allocation; the task logs."""
    logs = tmp_path / launch
    logs.mkdir()
    env = recipe_env(
        PATH=f"{_fake_slurm_bin(tmp_path / f'bin-{launch}')}:{recipe_env()['PATH']}",
        FAKE_SRUN_LOG_DIR=str(logs), LAUNCH=launch, PYTHON=sys.executable, GPUS_PER_NODE="1",
        SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="127.0.0.1,127.0.0.2",
        SLURM_SUBMIT_DIR=str(REPO), MASTER_PORT=str(free_port()),
    )
    ((rc, out),) = finish([start(["bash", str(SBATCH), *TINY_OVERRIDES], env)])
    task_logs = [p.read_text() for p in sorted(logs.glob("task*.log"))]
    assert rc == 0, out + "\n".join(failure_excerpt(log) for log in task_logs)
    assert "2 node(s) x 1 GPU(s)" in out and "rendezvous 127.0.0.1:" in out
    return task_logs


def test_sbatch_script_is_valid_bash_with_slurm_directives():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    text = SBATCH.read_text()
    for directive in ("--nodes=", "--ntasks-per-node=", "--gpus-per-node="):
        assert f"#SBATCH {directive}" in text


@pytest.fixture(scope="module")
def srun_per_gpu_logs(tmp_path_factory):
    return _submit(tmp_path_factory.mktemp("slurm"), "srun")


def test_one_task_per_gpu_reads_the_slurm_variables(srun_per_gpu_logs):
    first, last = srun_per_gpu_logs
    # initialize reports where the ranks came from: SLURM_PROCID / SLURM_NTASKS here.
    assert "initialized 2 rank(s) (slurm, gloo)" in first
    assert "data parallel 2" in first
    assert len(losses(last)) == 4, last[-3000:]


def test_one_torchrun_per_node_trains_to_the_same_losses(tmp_path, srun_per_gpu_logs):
    task_logs = _submit(tmp_path, "torchrun")
    combined = "\n".join(task_logs)
    # torchrun's RANK/WORLD_SIZE win over the SLURM_* variables its workers inherit.
    assert "initialized 2 rank(s) (torchrun, gloo)" in combined
    per_task = [losses(log) for log in task_logs]
    torchrun_losses = max(per_task, key=len)  # the task that holds the last rank prints them
    assert torchrun_losses == losses(srun_per_gpu_logs[1])
