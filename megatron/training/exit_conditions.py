"""Stopping a run cleanly: --exit-signal-handler, --exit-duration-in-mins, --exit-interval,
--phase-transition-iterations.

A signal may reach one rank only (a scheduler's SIGTERM to one node), and each rank's
clock differs: every step the ranks all-reduce (MAX) a "signal seen" flag and a "time is
up" flag, so all of them stop after the same step. When the training loop reads its steps
back an iteration late (``lagged``: optimizer steps on the device), the flags of step N are
all-reduced without waiting and read at step N+1, so the ranks still agree, one step later,
and the check adds no host sync. The run then saves a checkpoint (with --save) and ends normally: ``pretrain`` returns and the process exits with status 0
(``EXIT_CODE``), skipping the final evaluation.
"""

from __future__ import annotations

import signal
import time
from typing import Optional

import torch
import torch.distributed as dist

from megatron.core.optimizer.device_step import HostCopy
from megatron.core.tensor_parallel.collectives import comm_device
from megatron.training.phase_transitions import is_phase_transition

EXIT_CODE = 0


class SignalFlag:
    """Records that ``signal_name`` arrived; the handler only sets a flag."""

    def __init__(self, signal_name: str) -> None:
        self.signum = getattr(signal, signal_name)
        self.received = False
        self._previous = signal.signal(self.signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = True

    def release(self) -> None:
        signal.signal(self.signum, self._previous)


class ExitConditions:
    """Per-step decision, identical on every rank, of whether to stop and why."""

    def __init__(self, args, start_time: Optional[float] = None) -> None:
        self.args = args
        self.start_time = start_time if start_time is not None else time.time()
        self.signal = SignalFlag(args.exit_signal) if args.exit_signal_handler else None
        self.lagged = False  # set by the loop when its steps are read back an iteration late
        self._in_flight: Optional[HostCopy] = None

    def release(self) -> None:
        if self.signal is not None:
            self.signal.release()
            self.signal = None

    def _agreed(self, signal_seen: bool, time_up: bool, lagged: bool = False) -> tuple:
        """The flags OR-ed over the ranks; ``lagged``: those given at the previous call."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return signal_seen, time_up
        flags = torch.tensor([int(signal_seen), int(time_up)], dtype=torch.int32,
                             device=comm_device(dist.group.WORLD))
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if not lagged:
            return bool(flags[0].item()), bool(flags[1].item())
        previous, self._in_flight = self._in_flight, HostCopy({"signal": flags[0], "time_up": flags[1]})
        if previous is None:
            return False, False
        values = previous.values()
        return bool(values["signal"]), bool(values["time_up"])

    def signal_during_setup(self) -> bool:
        """Whether the exit signal reached any rank while the model or the datasets were being
        built (collective with --exit-signal-handler): the run then ends before training."""
        if self.signal is None:
            return False
        return self._agreed(self.signal.received, False)[0]

    def reason(self, iteration: int) -> Optional[str]:
        """Why to stop after ``iteration`` (collective when a signal handler or a duration
        limit is set), or None to go on."""
        args = self.args
        duration = args.exit_duration_in_mins
        if self.signal is not None or duration:
            time_up = bool(duration) and (time.time() - self.start_time) / 60.0 > duration
            signal_seen, time_up = self._agreed(self.signal is not None and self.signal.received, time_up,
                                                lagged=self.lagged)
            if signal_seen:
                return f"received {args.exit_signal}"
            if time_up:
                return f"--exit-duration-in-mins {duration} reached"
        if args.exit_interval and iteration % args.exit_interval == 0:
            return f"--exit-interval {args.exit_interval}"
        if is_phase_transition(args, iteration):
            return f"--phase-transition-iterations: the phase ends at iteration {iteration}"
        return None
