"""The training step's result checks, through the rerun state machine.

The NaN check (on by default; ``--no-check-for-nan-in-loss-and-grad``), ``--check-for-spiky-loss`` and
``--check-for-large-grads`` name what is checked; ``--rerun-mode`` what happens to a rejected
result (``megatron.core.rerun_state_machine`` explains the machine); ``--error-injection-rate``
and ``--error-injection-type`` corrupt results on purpose to test it;
``--result-rejected-tracker-filename`` is a file that gets one line per rejected result.

The values checked are this rank's: the loss averaged over its own micro-batches (on the
last pipeline stage) and the norm of its gradients after the data-parallel reduction.
"""

from __future__ import annotations

import datetime
import math
import socket
from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron.core.fp8.scaling import fp8_state_is_finite
from megatron.core.rerun_state_machine import (
    EXIT_CODE_FAILED_ON_RESULT_VALIDATION,
    SPIKE_FACTOR,
    Check,
    RerunDataIterator,
    RerunErrorInjector,
    RerunMode,
    RerunStateMachine,
    ResultRejected,
    Verdict,
)
from megatron.training.nan_check import NonFiniteError, check_finite
from megatron.training.rank_print import print_rank_0


def _local_loss(reported: List[dict]) -> Optional[float]:
    """The first reported loss averaged over this rank's micro-batches (None off the last stage)."""
    if not reported:
        return None
    key = next(iter(reported[0]))
    values = [report[key].detach().float().view(-1) for report in reported]
    if values[0].numel() == 2:  # [loss sum, token count] per micro-batch
        total = torch.stack(values).sum(dim=0).cpu()  # one device-to-host copy
        return float(total[0] / total[1]) if total[1] > 0 else float(total[0])
    return float(torch.cat(values).mean())


def _local_grad_norm(model) -> float:
    grads = []
    for chunk in model:
        for param in chunk.parameters():
            grad = getattr(param, "main_grad", None)
            grad = param.grad if grad is None else grad
            if grad is not None:
                grads.append(grad)
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float()))


class TrackerFile:
    """``--result-rejected-tracker-filename``: one line per rejected result, appended:
    time, iteration, rank, host, the check, the status and the values of both runs."""

    def __init__(self, path: str) -> None:
        try:
            with open(path, "a"):
                pass
        except OSError as error:
            raise ValueError(f"--result-rejected-tracker-filename {path}: cannot append to it ({error.strerror}); "
                             "give a writable path") from error
        self.path = path

    def __call__(self, iteration: int, name: str, status: str, first, rerun) -> None:
        rank = dist.get_rank() if dist.is_initialized() else 0
        line = (f"{datetime.datetime.now().isoformat(timespec='seconds')} iteration={iteration} rank={rank} "
                f"host={socket.gethostname()} check={name} status={status} value={first!r} rerun_value={rerun!r}\n")
        with open(self.path, "a") as handle:
            handle.write(line)


class StepValidation:
    """Owns the machine for one run; ``run`` replaces the bare forward-backward of a step."""

    def __init__(self, args, machine: RerunStateMachine) -> None:
        self.args = args
        self.machine = machine
        self.iterators: List[RerunDataIterator] = []

    def wrap(self, train_it):
        """The data iterator(s) as the step reads them, replayable (one wrapper per iterator)."""
        if train_it is None:
            return None
        if not isinstance(train_it, list):
            wrapped = RerunDataIterator(train_it)
            self.iterators.append(wrapped)
            return wrapped
        by_id = {}
        for it in train_it:
            if it is not None and id(it) not in by_id:
                by_id[id(it)] = RerunDataIterator(it)
        self.iterators.extend(by_id.values())
        return [None if it is None else by_id[id(it)] for it in train_it]

    def run(self, iteration: int, forward_backward: Callable[[], List[dict]], model) -> Tuple[Verdict, List[dict]]:
        """Run the step's forward-backward through the machine; returns the verdict and the
        loss reports of its last run. A reproduced NaN raises ``NonFiniteError`` naming the ranks."""
        reports: List[List[dict]] = []

        def measured():
            reports.append(forward_backward())
            values = {}
            if "loss" in self.machine.checks and reports[-1]:
                values["loss"] = _local_loss(reports[-1])
            if "grad_norm" in self.machine.checks:
                values["grad_norm"] = _local_grad_norm(model)
                if self.machine.checks["grad_norm"].fatal and not fp8_state_is_finite(model):
                    values["grad_norm"] = math.nan  # a NaN/Inf reached an FP8 amax or scale
            return values

        try:
            verdict = self.machine.run_step(iteration, measured, self.iterators)
        except ResultRejected as rejected:
            self._raise_named(rejected, reports[-1], model, iteration)
        # The last run's reports: its gradients are the ones in the buffers (report_stats applies
        # the rerun's step; a validated rerun reproduced the first).
        return verdict, reports[-1]

    def _raise_named(self, rejected: ResultRejected, reported, model, iteration: int) -> None:
        if "NaN or Inf" in str(rejected):
            # The NaN check's own message names the ranks and what was bad; every rank is here.
            try:
                check_finite([v for r in reported for v in r.values()], model, iteration,
                             check_grads=self.machine.checks.get("grad_norm", Check(False)).fatal)
            except NonFiniteError as error:
                suffix = " (reproduced when the iteration was re-run)" if "reproduced" in str(rejected) else ""
                raise NonFiniteError(f"{error}{suffix}") from None
            raise NonFiniteError(f"{rejected}. The optimizer step was not taken.") from None
        raise rejected

    @property
    def log_counter(self) -> Optional[int]:
        """Rejected (skipped) iterations so far, for the log line when spikes are checked."""
        if self.args.check_for_spiky_loss or self.args.check_for_large_grads or self.args.error_injection_rate:
            return self.machine.rejected_total
        return None


def build_step_validation(args, group=None) -> Optional[StepValidation]:
    """The validation the flags ask for, or None when no check is on and nothing is injected."""
    nan_check = bool(args.check_for_nan_in_loss_and_grad)
    checks = {}
    if nan_check or args.check_for_spiky_loss:
        checks["loss"] = Check(fatal=nan_check, spike_factor=SPIKE_FACTOR if args.check_for_spiky_loss else None)
    grads_fatal = nan_check and not args.fp16  # fp16 overflows are the loss scaler's business
    if grads_fatal or args.check_for_large_grads:
        checks["grad_norm"] = Check(fatal=grads_fatal,
                                    spike_factor=SPIKE_FACTOR if args.check_for_large_grads else None)
    if not checks:
        return None
    tracker = args.result_rejected_tracker_filename
    machine = RerunStateMachine(
        mode=RerunMode(args.rerun_mode), checks=checks,
        injector=RerunErrorInjector(args.error_injection_rate, args.error_injection_type, seed=args.seed),
        group=group, on_rejection=TrackerFile(tracker) if tracker else None,
        report_interval=max(1, args.log_interval))
    return StepValidation(args, machine)


def stop_after_failed_validation(iteration: int) -> None:
    """A rejected result did not reproduce: exit with Megatron-LM's code 17, so that the
    scheduler can take the node out and the job resume elsewhere. The caller has saved the
    last completed iteration (the failed one was not applied)."""
    print_rank_0(f"exiting program at iteration {iteration}: a rejected result did not reproduce when the "
                 f"iteration was re-run (suspected hardware fault); exit code {EXIT_CODE_FAILED_ON_RESULT_VALIDATION}. "
                 "Resume from the last checkpoint, on other nodes if this one is suspect.")
    raise SystemExit(EXIT_CODE_FAILED_ON_RESULT_VALIDATION)
