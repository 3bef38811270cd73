"""Run the multi-node example recipes on one CPU host and read their losses."""

from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path
from typing import Dict, List, Sequence

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "multinode"

# Appended to the recipes' own flags, which they override: a tiny GPT for a few iterations.
TINY_OVERRIDES = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "32", "--max-position-embeddings", "32",
    "--micro-batch-size", "2", "--global-batch-size", "8", "--vocab-size", "512",
    "--train-iters", "4", "--lr-warmup-iters", "1", "--log-interval", "1", "--eval-iters", "0",
    "--hidden-dropout", "0", "--attention-dropout", "0", "--num-workers", "0",
    "--distributed-backend", "gloo",
]
LOSS = re.compile(r"lm loss: ([0-9.Ee+-]+)")
TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recipe_env(**values: str) -> Dict[str, str]:
    """The test's environment for a recipe: fp32 on CPU, one thread per process (two
    processes share a 2-core machine), nothing inherited from an enclosing launcher."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "MASTER_", "TORCHELASTIC_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PRECISION="fp32", OMP_NUM_THREADS="1", PYTHON=os.environ.get("PYTHON_FOR_TESTS", "python3"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.update(values)
    return env


def start(cmd: Sequence[str], env: Dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(list(cmd), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(procs: List[subprocess.Popen]) -> List[tuple]:
    """(return code, output) of each process; all are killed if any outlives the timeout."""
    results = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=TIMEOUT_S)
            results.append((proc.returncode, out))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        raise
    return results


def losses(log: str) -> List[float]:
    return [float(x) for x in LOSS.findall(log)]


def failure_excerpt(log: str, limit: int = 4000) -> str:
    """The part of a failed run's output worth reading: from the first traceback on (torchrun
    prints its own summary after the worker's), else the tail."""
    start_at = log.find("Traceback")
    return log[start_at:start_at + limit] if start_at >= 0 else log[-limit:]
