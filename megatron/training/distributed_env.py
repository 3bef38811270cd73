"""Where this process sits in the job: torchrun's variables, slurm's, or a lone process."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class DistributedEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"
    restart_count: int = 0  # torchrun --max-restarts: how many times the ranks were started again
    max_restarts: int = 0

    # torchrun's agent hosts the rendezvous store (TORCHELASTIC_USE_AGENT_STORE) and keeps
    # it, with the keys the ranks wrote into it, across restarts.
    agent_store: bool = False

    def attempt_prefix(self) -> str:
        """Store key prefix of this start of the ranks. Gloo publishes each rank's listening
        address in the store; after a restart, ranks reading the previous attempt's
        addresses from the agent's store connect to dead ports ("Connection refused") or to
        a reused one (a hang). A prefix per restart keeps the attempts apart."""
        return f"megatron/attempt_{self.restart_count}/"


def _first_slurm_host(nodelist: str) -> str:
    """First host of a slurm node list such as ``gpu[003-005,010],cpu01``."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not match:
        raise ValueError(f"cannot read a host from SLURM_JOB_NODELIST={nodelist!r}; set MASTER_ADDR")
    prefix, ranges = match.group(1), match.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _int_env(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def detect_distributed_env() -> DistributedEnv:
    """Read the launcher's environment.

    torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Under a bare
    ``srun`` (one task per GPU) SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID give the
    ranks, MASTER_ADDR defaults to the first node of the allocation and MASTER_PORT to
    6000. With neither, this is a single process on 127.0.0.1.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistributedEnv(
            rank=_int_env("RANK"),
            world_size=_int_env("WORLD_SIZE"),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", "29500")),
            launcher="torchrun",
            restart_count=int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0),
            max_restarts=int(env.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0),
            agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        addr = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
        return DistributedEnv(
            rank=_int_env("SLURM_PROCID"),
            world_size=_int_env("SLURM_NTASKS"),
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            master_addr=addr,
            master_port=int(env.get("MASTER_PORT", "6000")),
            launcher="slurm",
        )
    return DistributedEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", _free_port())), "single")


def export_env(denv: DistributedEnv) -> None:
    """Publish the values under torchrun's names, which argument parsing and users read."""
    os.environ.update(
        RANK=str(denv.rank),
        WORLD_SIZE=str(denv.world_size),
        LOCAL_RANK=str(denv.local_rank),
        MASTER_ADDR=denv.master_addr,
        MASTER_PORT=str(denv.master_port),
    )
