"""User mistakes end a run with one clean message and exit code 2; bugs keep their traceback.

A mistake in the command line or in a file it names (a ValueError from flag validation, a
missing file) is the same on every rank: a traceback per rank, each ending in the same line,
buries the one thing the user needs. Set MEGATRON_SHOW_TRACEBACK=1 to see the traceback anyway.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys

import torch.distributed as dist

logger = logging.getLogger(__name__)

SHOW_TRACEBACK_ENV = "MEGATRON_SHOW_TRACEBACK"
USER_ERROR_EXIT_CODE = 2  # argparse's code for a bad command line

# What setup (parsing, validation, building the model and the datasets, loading) raises for a
# user's mistake: the house rule is a ValueError naming the flag, and the OS errors of a file a
# flag names. Once training runs a ValueError may be a bug, so only UserError counts there.
_SETUP_USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


class UserError(ValueError):
    """A user's mistake found while training runs (e.g. a static loss scale that overflows
    every step): reported like a setup error, without a traceback."""


def _rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


def _alone() -> bool:
    """Whether this process is the only one of its job although RANK may be any rank
    (--fake-process-group on the command line): it speaks, as rank 0 would."""
    return "--fake-process-group" in sys.argv[1:]


def _show_traceback() -> bool:
    return os.environ.get(SHOW_TRACEBACK_ENV, "").strip().lower() in ("1", "true", "yes")


@contextlib.contextmanager
def argparse_output_on_rank_0():
    """argparse prints its usage and error (or --help) on every rank of a launcher; only rank 0's
    copy is kept. The SystemExit still ends every rank with argparse's code."""
    if _rank() == 0 or _alone():
        yield
        return
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        yield


@contextlib.contextmanager
def user_errors(setup: bool = True):
    """Turn a user's mistake raised inside into one message and exit code 2.

    ``setup`` True: ValueError and a missing/unreadable file count as user errors, else only
    UserError. Before the process group exists every rank fails alike and rank 0 alone speaks;
    afterwards a rank other than 0 may be the only one that knows (its own data shard), so it
    speaks too, naming itself.
    """
    kinds = _SETUP_USER_ERRORS if setup else (UserError,)
    try:
        yield
    except kinds as err:
        if _show_traceback():
            raise
        rank = _rank()
        initialized = dist.is_available() and dist.is_initialized()
        if rank == 0 or initialized or _alone():
            where = "" if rank == 0 else f"[rank {rank}] "
            sys.stderr.write(f"{where}error: {err}\n(set {SHOW_TRACEBACK_ENV}=1 for the traceback)\n")
            sys.stderr.flush()
        _release_process_groups()
        sys.exit(USER_ERROR_EXIT_CODE)


def _release_process_groups() -> None:
    """Destroy this rank's process groups before exiting. Left to interpreter exit, gloo's
    worker threads can be torn down while still joinable, which aborts the process (status
    134) instead of exiting with the user-error code. Local only (no barrier): the other ranks
    may be anywhere."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    from megatron.core import parallel_state

    try:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    except Exception as err:  # exiting anyway; the user's message is already out
        logger.debug("releasing the process groups before exit failed: %s", err)
