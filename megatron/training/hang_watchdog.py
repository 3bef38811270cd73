"""``--hang-watchdog-seconds N``: say where a rank is stuck before the process-group timeout.

The training loop names the phase it enters (``set_phase``: forward-backward, optimizer,
checkpoint save, evaluation) with the iteration; entering a phase is progress. A daemon
thread wakes every second or so and, when no phase was entered for N seconds, logs the rank,
the iteration and the phase in flight, and dumps every thread's Python stack (faulthandler:
the main thread's shows the collective or the read it waits in). With
``--hang-watchdog-exit`` the process then exits with ``HANG_EXIT_CODE``, so a launcher with
restarts (torchrun ``--max-restarts``) starts the job again from its last checkpoint instead
of waiting for the process-group timeout (10 minutes by default, NCCL's may be longer).

Each stall is reported once; a phase entered afterwards re-arms the watchdog. N must exceed
the longest legitimate phase (a checkpoint save, an evaluation) of the run.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time
from typing import IO, Optional

logger = logging.getLogger(__name__)

# The status of a process the watchdog ended (what coreutils' timeout uses for "timed out").
HANG_EXIT_CODE = 124


class HangWatchdog:
    """Watches the phase the loop is in; ``stream`` receives the stack dump (a real file:
    faulthandler writes to its descriptor)."""

    def __init__(self, seconds: float, rank: int, exit_on_hang: bool = False, stream: Optional[IO] = None,
                 poll_seconds: Optional[float] = None) -> None:
        self.seconds, self.rank, self.exit_on_hang = seconds, rank, exit_on_hang
        self.stream = stream
        self.poll_seconds = poll_seconds or min(1.0, seconds / 4)
        self.phase, self.iteration = "start", None
        self._entered = time.monotonic()
        self._reported = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)

    def start(self) -> "HangWatchdog":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def set_phase(self, phase: str, iteration: Optional[int] = None) -> None:
        """Entering ``phase`` (of ``iteration``, when given) is progress."""
        self.phase = phase
        if iteration is not None:
            self.iteration = iteration
        self._entered = time.monotonic()
        self._reported = False

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            stalled = time.monotonic() - self._entered
            if stalled >= self.seconds and not self._reported:
                self._reported = True
                self._report(stalled)

    def _report(self, stalled: float) -> None:
        where = f"iteration {self.iteration}" if self.iteration is not None else "before the first iteration"
        message = (f"rank {self.rank}: no progress for {stalled:.0f} s (--hang-watchdog-seconds {self.seconds:g}) "
                   f"at {where}, phase {self.phase}; every thread's stack follows")
        logger.error(message)
        stream = self.stream or sys.stderr
        stream.write(f"hang watchdog: {message}\n")
        stream.flush()
        faulthandler.dump_traceback(file=stream, all_threads=True)
        stream.flush()
        if self.exit_on_hang:
            logger.error("rank %d: exiting with status %d (--hang-watchdog-exit)", self.rank, HANG_EXIT_CODE)
            os._exit(HANG_EXIT_CODE)  # the main thread is stuck: a normal exit would wait for it


_WATCHDOG: Optional[HangWatchdog] = None
# The loop's position, kept whether or not a watchdog runs (it names where a rank failed).
_WHERE = {"phase": "start", "iteration": None}


def start_hang_watchdog(args, rank: int) -> Optional[HangWatchdog]:
    """The watchdog the flags ask for (None when ``--hang-watchdog-seconds`` is 0), started."""
    global _WATCHDOG
    seconds = args.hang_watchdog_seconds
    if not seconds:
        return None
    if seconds < 0:
        raise ValueError(f"--hang-watchdog-seconds {seconds:g}: give a positive number of seconds, or 0 to turn "
                         "the watchdog off")
    _WATCHDOG = HangWatchdog(seconds, rank, exit_on_hang=args.hang_watchdog_exit).start()
    return _WATCHDOG


def stop_hang_watchdog() -> None:
    global _WATCHDOG
    if _WATCHDOG is not None:
        _WATCHDOG.stop()
        _WATCHDOG = None


def set_phase(phase: str, iteration: Optional[int] = None) -> None:
    """Record that the loop entered ``phase`` (and tell the watchdog, if any); costs a few
    attribute writes."""
    _WHERE["phase"] = phase
    if iteration is not None:
        _WHERE["iteration"] = iteration
    if _WATCHDOG is not None:
        _WATCHDOG.set_phase(phase, iteration)


def where() -> str:
    """``iteration N, phase P``: the loop's position, for messages about a failure."""
    iteration = _WHERE["iteration"]
    at = f"iteration {iteration}" if iteration is not None else "before the first iteration"
    return f"{at}, phase {_WHERE['phase']}"


def log_failure(rank: int, error: BaseException) -> None:
    """One line naming the rank and where the loop was when ``error`` ended it (a peer that
    died surfaces here as a collective's error)."""
    logger.error("rank %d failed at %s: %s: %s", rank, where(), type(error).__name__, error)
