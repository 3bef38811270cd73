"""Run a function on N ranks, each its own process, over gloo on 127.0.0.1.

    results = run_on_ranks(fn, world_size=4, args=(...))

``fn(rank, world_size, *args)`` runs in a fresh process after
``torch.distributed.init_process_group("gloo")``; its return values come back as a list
indexed by rank (they must pickle). A failure on any rank raises ``RankFailure`` with that
rank's traceback; a rank that hangs is killed by pid after ``timeout`` seconds, so a
deadlock fails one test instead of the whole run. ``fn`` must be importable by name (a
module-level function), because the children are not forks of the caller.

The ranks are forked from a multiprocessing forkserver that has imported torch and the
training entry points once (PRELOAD): a spawned rank spends ~5 s of a 2-core machine
importing them, and the suite starts a few hundred. The forkserver has run nothing but
imports, so each rank starts as clean as a spawned one; it gets the caller's current
environment, working directory and stdout / stderr file descriptors (a fork would
otherwise see the server's, and pytest's ``capfd`` would miss what the ranks print).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import signal
import socket
import traceback
from datetime import timedelta
from multiprocessing import reduction
from typing import Any, Callable, List, Sequence

GLOO_TIMEOUT_S = 60
PRELOAD = ["torch", "megatron.training.training", "pretrain_gpt", "pretrain_bert", "pretrain_mamba"]


class RankFailure(AssertionError):
    """A rank raised, died or timed out."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _received_fd(dup) -> int:
    return dup.detach()


class _CallerFd:
    """A file descriptor of the caller that the rank receives (pickled while the process
    starts, the forkserver passes it over its socket)."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        return _received_fd, (reduction.DupFd(self.fd),)


def _child(fn, rank, world_size, port, args, kwargs, results, environ, cwd, stdout_fd, stderr_fd):
    os.dup2(stdout_fd, 1)
    os.dup2(stderr_fd, 2)
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        # In-process runs report a rank's exception to the parent: keep a user error's
        # traceback rather than the entry point's one-line message and exit code 2.
        MEGATRON_SHOW_TRACEBACK="1",
    )
    import torch
    import torch.distributed as dist

    # Each rank gets its share of the cores: oversubscribing a 2-core machine with
    # 4 ranks x N threads makes every collective wait on a descheduled peer.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=GLOO_TIMEOUT_S),
        )
        out = fn(rank, world_size, *args, **kwargs)
        # Pickle by value here: the queue's own pickler would share tensor storage through
        # file descriptors that die with this process, racing the parent's read.
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:  # report every failure, including SystemExit, to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        try:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
        except Exception:
            pass
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    kwargs: dict | None = None,
    timeout: float = 240.0,
) -> List[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` processes."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    results = ctx.Queue()
    port = free_port()
    caller = (dict(os.environ), os.getcwd(), _CallerFd(1), _CallerFd(2))
    procs = [
        ctx.Process(target=_child, args=(fn, r, world_size, port, tuple(args), kwargs or {}, results, *caller),
                    daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outputs: dict = {}
    failures: List[str] = []
    try:
        import time

        deadline = time.monotonic() + timeout
        while len(outputs) + len(failures) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                failures.append(f"timed out after {timeout:.0f}s; ranks done: {sorted(outputs)}")
                break
            try:
                rank, ok, payload = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in outputs]
                if dead and len(outputs) + len(failures) < world_size:
                    # give a crashed rank's peers a moment to report, then stop waiting
                    try:
                        rank, ok, payload = results.get(timeout=2.0)
                    except queue.Empty:
                        failures.append(f"rank(s) {dead} died with exit codes {[procs[i].exitcode for i in dead]}")
                        break
                else:
                    continue
            if ok:
                outputs[rank] = pickle.loads(payload)
            else:
                failures.append(f"rank {rank} failed:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5)
        for p in procs:
            if p.is_alive() and p.pid is not None:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.join(timeout=5)
    if failures:
        raise RankFailure("\n".join(failures))
    return [outputs[r] for r in range(world_size)]
