"""Launch pretrain_gpt.py as its own process (torchrun for N > 1) and read its log.

    log = run_pretrain(2, flags)          # torchrun --standalone --nproc-per-node 2
    losses(log), grad_norms(log)          # one value per logged iteration

The run starts from the repository root with the repository on PYTHONPATH and
NCCL_NVLS_ENABLE=0 (NVLink multicast off); other NCCL / TORCH_NCCL_* settings are left to
their defaults. Launcher variables of an enclosing job (RANK, MASTER_*, SLURM_*, ...) are
dropped, so the child sees only what torchrun gives it.

CPU mode, for checking this harness where there is no GPU: with MEGATRON_GPU_TESTS_ON_CPU=1
every run also gets ``--distributed-backend gloo --num-workers 0 --use-cpu-initialization``
(each unless the flags already set it) and one thread per process. The GPU tests call the
same functions either way.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from tests.training.gpt_runs import grad_norms, losses  # noqa: F401  (re-exported: the one place the log regexes live)

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300
TAIL_LINES = 40
CPU_MODE_ENV = "MEGATRON_GPU_TESTS_ON_CPU"
# The unfused reference path of every fused region (no compile time).
REFERENCE_PATH = [
    "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion", "--no-rope-fusion",
    "--no-persist-layer-norm", "--no-bias-gelu-fusion",
]
CPU_FLAGS = [("--distributed-backend", "gloo"), ("--num-workers", "0"), ("--use-cpu-initialization",)]
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK")
_LAUNCHER_PREFIXES = ("MASTER_", "SLURM_", "TORCHELASTIC_", "OMPI_", "PMI_")


class PretrainFailed(AssertionError):
    """pretrain_gpt.py exited non-zero or ran past its timeout."""


def llama_flags(hidden: int, ffn: int, seq: int, vocab: int, mbs: int, gbs: int) -> list[str]:
    """A 4-layer LLaMA-style GPT (8 heads in 4 query groups, SwiGLU, RMSNorm, RoPE, no
    biases, untied embeddings) on mock data, dropout off, logging every iteration, with the
    same initial weights for every layout (--use-cpu-initialization)."""
    return [
        "--num-layers", "4", "--hidden-size", str(hidden), "--num-attention-heads", "8",
        "--group-query-attention", "--num-query-groups", "4", "--ffn-hidden-size", str(ffn),
        "--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope",
        "--disable-bias-linear", "--untie-embeddings-and-output-weights",
        "--seq-length", str(seq), "--max-position-embeddings", str(seq),
        "--tokenizer-type", "NullTokenizer", "--vocab-size", str(vocab), "--mock-data",
        "--micro-batch-size", str(mbs), "--global-batch-size", str(gbs),
        "--hidden-dropout", "0", "--attention-dropout", "0",
        "--log-interval", "1", "--eval-iters", "0", "--use-cpu-initialization",
    ]


def cpu_mode() -> bool:
    """True when the GPU tests are being run on CPU (MEGATRON_GPU_TESTS_ON_CPU=1)."""
    return os.environ.get(CPU_MODE_ENV, "") == "1"


def command(nproc: int, flags: Sequence[str]) -> list[str]:
    """The command line of a run on ``nproc`` processes."""
    if nproc < 1:
        raise ValueError(f"run_pretrain needs nproc >= 1, got {nproc}")
    flags = list(flags)
    if cpu_mode():
        for option in CPU_FLAGS:  # the caller's own value of one of these wins
            if option[0] not in flags:
                flags += list(option)
    if nproc == 1:
        return [sys.executable, "pretrain_gpt.py"] + flags
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "pretrain_gpt.py"] + flags


def environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCHER_VARS and not k.startswith(_LAUNCHER_PREFIXES)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env["NCCL_NVLS_ENABLE"] = "0"
    env.setdefault("PYTHONUNBUFFERED", "1")
    if cpu_mode():
        env["OMP_NUM_THREADS"] = "1"
    env.update(extra or {})
    return env


def _tail(log: str, n: int = TAIL_LINES) -> str:
    return "\n".join(log.splitlines()[-n:])


def _first_traceback(log: str, n: int = TAIL_LINES) -> str:
    """The first worker traceback (torchrun's own summary comes after it), or ''."""
    lines = log.splitlines()
    starts = [i for i, line in enumerate(lines) if "Traceback (most recent call last)" in line]
    if not starts or starts[0] >= len(lines) - n:  # none, or already inside the tail
        return ""
    return "\n".join(lines[starts[0]:starts[0] + n])


def run_pretrain(nproc: int, flags: Sequence[str], log_path: str | None = None, timeout: float = TIMEOUT_S,
                 env: dict[str, str] | None = None) -> str:
    """Run pretrain_gpt.py with ``flags`` on ``nproc`` processes; return stdout+stderr.

    ``log_path``: also write the whole log there; ``env``: extra environment variables.
    Raises PretrainFailed, with the command and the last 40 log lines, when the run exits
    non-zero or takes longer than ``timeout`` seconds (then its whole process group is
    killed).
    """
    cmd = command(nproc, flags)
    proc = subprocess.Popen(cmd, cwd=REPO, env=environment(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    timed_out = False
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)  # the session this call started: torchrun and its workers
        log, _ = proc.communicate()
    if log_path is not None:
        Path(log_path).write_text(log)
    if timed_out or proc.returncode != 0:
        why = f"ran past its {timeout:.0f} s timeout" if timed_out else f"exited with code {proc.returncode}"
        where = f" (full log: {log_path})" if log_path is not None else ""
        raise PretrainFailed(
            f"pretrain_gpt.py on {nproc} process(es) {why}{where}.\n"
            f"command: {' '.join(cmd)}\n"
            + (f"first traceback:\n{_first_traceback(log)}\n" if _first_traceback(log) else "")
            + f"last {TAIL_LINES} log lines:\n{_tail(log)}"
        )
    return log
