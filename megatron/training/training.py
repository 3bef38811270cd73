"""The training driver: ``pretrain()`` and the loop it runs."""

from __future__ import annotations

import functools
import itertools
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.fake_backend import is_fake
from megatron.core.fp8.replica_sync import merge_over_replicas
from megatron.core.optimizer.device_step import DeviceStepResult, HostCopy
from megatron.core.num_microbatches_calculator import (
    get_current_global_batch_size,
    get_num_microbatches,
    update_num_microbatches,
)
from megatron.core.pipeline_parallel.schedules import get_forward_backward_func
from megatron.core.process_groups import ProcessGroups
from megatron.core.rerun_state_machine import Verdict
from megatron.training.cuda_graph_args import graphed_forward_backward
from megatron.training.checkpointing import convert_checkpoint_format, save_checkpoint, wait_for_pending_save
from megatron.training.arguments import parse_args
from megatron.training.data_iterators import build_train_valid_test_data_iterators
from megatron.training.dry_run import dry_run
from megatron.training.exit_conditions import ExitConditions
from megatron.training.flops import num_floating_point_operations
from megatron.training.evaluation import evaluate_and_print_results
from megatron.training.global_vars import get_args, get_timers
from megatron.training.hang_watchdog import log_failure, set_phase, start_hang_watchdog, stop_hang_watchdog
from megatron.training.housekeeping import ManualGC, empty_unused_memory
from megatron.training.initialize import initialize_megatron
from megatron.training.loss_reduction import reduce_reported_losses
from megatron.training.model_setup import setup_model_and_optimizer, unwrap_model
from megatron.training.params_norm import params_l2_norm
from megatron.training.profiling import StepProfiler
from megatron.training.progress_log import ProgressLog
from megatron.training.rank_print import print_rank_0, print_rank_last
from megatron.training.result_validation import StepValidation, build_step_validation, stop_after_failed_validation
from megatron.training.run_state import RunState
from megatron.training.static_loss_scale import StaticLossScaleGuard
from megatron.training.startup_summary import log_startup_summary
from megatron.training.training_log import IterationStats, TrainingLogger, memory_report
from megatron.training.user_errors import argparse_output_on_rank_0, user_errors
from megatron.training.writers import ScalarWriters, build_tensorboard_writer, build_wandb_writer


@dataclass
class StepResult:
    losses: dict
    skipped: bool
    grad_norm: Optional[float]
    num_zeros: Optional[int]
    stop: bool = False  # a rejected result did not reproduce (rerun state machine): save and exit 17
    # A step taken on the device (``optimizer.step_on_device``): ``skipped``, ``grad_norm`` and
    # ``num_zeros`` are unknown until ``settle()`` reads them back, with the losses, from
    # ``pending``; the learning-rate scheduler then advances by ``scheduler_increment``.
    pending: Optional[HostCopy] = None
    scheduler_increment: int = 0

    def settle(self, scheduler) -> "StepResult":
        """The host values of a step taken on the device (waiting for its read-back only);
        the scheduler advances if the update was applied. Nothing to do for a host step."""
        if self.pending is None:
            return self
        values = self.pending.values()
        self.pending = None
        self.losses = {key[len("loss:"):]: value for key, value in values.items() if key.startswith("loss:")}
        update_successful, self.grad_norm, self.num_zeros = DeviceStepResult.as_host_triple(values)
        self.skipped = not update_successful
        if update_successful:
            scheduler.step(increment=self.scheduler_increment)
        return self


def pretrain(train_valid_test_dataset_provider: Callable, model_provider: Callable, model_type,
             forward_step_func: Callable, process_non_loss_data_func=None, extra_args_provider=None,
             args_defaults=None, ignore_unknown_args: bool = False,
             num_floating_point_operations_func: Optional[Callable] = None, **unused) -> None:
    """Megatron's entry point: initialize, build, train, evaluate.

    ``model_provider(pre_process, post_process)`` builds this stage's model;
    ``forward_step_func(data_iterator, model)`` returns ``(output, loss_func)``;
    ``train_valid_test_dataset_provider(num_samples)`` returns three datasets.
    ``num_floating_point_operations_func(args, batch_size)`` is the model family's FLOP count
    per iteration (default: the dense GPT formula), for the throughput log and the total.
    """
    start = time.time()
    with argparse_output_on_rank_0(), user_errors():
        parsed = parse_args(extra_args_provider, ignore_unknown_args)
    with user_errors():
        built = _setup(parsed, start, train_valid_test_dataset_provider, model_provider, extra_args_provider,
                       args_defaults, ignore_unknown_args, num_floating_point_operations_func)
    if built is None:
        return
    with user_errors(setup=False):
        _train_and_evaluate(forward_step_func, num_floating_point_operations_func, *built)


def _setup(parsed, start, train_valid_test_dataset_provider, model_provider, extra_args_provider, args_defaults,
           ignore_unknown_args, flops_func):
    """Initialize, build the model, optimizer and data iterators; None when the run ends here
    (--dry-run, --ckpt-convert-format)."""
    if parsed.dry_run:
        dry_run(parsed, model_provider, args_defaults, flops_func)
        return None
    finish = initialize_megatron(extra_args_provider, args_defaults, ignore_unknown_args, parsed_args=parsed)
    if callable(finish):  # --lazy-mpu-init: nothing after this point could complete it later
        finish()
    args = get_args()
    pg = parallel_state.get_process_groups()
    print_rank_0(f"> time to initialize: {time.time() - start:.1f} s")
    # The --exit-signal-handler handler is installed before anything slow is built, so a
    # scheduler's signal during construction ends the run cleanly at the next check.
    exit_conditions = ExitConditions(args, start_time=start)
    run_state = RunState()
    try:
        model, optimizer, scheduler = setup_model_and_optimizer(model_provider, pg, run_state)
        run_state.publish(args)
        if _stop_during_setup(exit_conditions, "building the model"):
            return None
        log_startup_summary(args, model, pg, model_provider, flops_func)
        if args.ckpt_convert_format is not None:
            target = convert_checkpoint_format(model, optimizer, scheduler, args, pg, run_state=run_state)
            print_rank_0(f"> saved iteration {run_state.iteration} of {args.load} as {args.ckpt_convert_format} "
                         f"in {target}")
            exit_conditions.release()
            return None
        train_it, valid_it, test_it = (
            iterators_per_chunk(it, model)
            for it in build_train_valid_test_data_iterators(train_valid_test_dataset_provider, pg, run_state)
        )
        if _stop_during_setup(exit_conditions, "building the datasets"):
            return None
    except BaseException:
        exit_conditions.release()
        raise
    return exit_conditions, args, pg, run_state, model, optimizer, scheduler, train_it, valid_it, test_it


def _stop_during_setup(exit_conditions: ExitConditions, phase: str) -> bool:
    """True (and the handler released) when the exit signal arrived during ``phase``."""
    if not exit_conditions.signal_during_setup():
        return False
    print_rank_0(f"exiting program before training: received {exit_conditions.args.exit_signal} while {phase}")
    exit_conditions.release()
    return True


def _train_and_evaluate(forward_step_func, num_floating_point_operations_func, exit_conditions, args, pg,
                        run_state: RunState, model, optimizer, scheduler, train_it, valid_it, test_it):
    """Train, save the last iteration, then evaluate on the validation and test sets."""
    writers = ScalarWriters(build_tensorboard_writer(args), build_wandb_writer(args))
    progress = ProgressLog(args, run_state)
    iteration = run_state.iteration
    stopped_early = False
    try:
        if args.skip_train:
            print_rank_0("> skipping training (--skip-train): evaluation only")
        elif args.do_train and (args.train_iters or args.train_samples):
            iteration, stopped_early = train(forward_step_func, model, optimizer, scheduler, train_it, valid_it,
                                             pg, writers, exit_conditions, progress,
                                             flops_func=num_floating_point_operations_func, run_state=run_state)
        if args.save and not args.skip_train and iteration != 0 and run_state.last_saved_iteration != iteration:
            save_checkpoint(iteration, model, optimizer, scheduler, run_state.floating_point_operations_so_far,
                            args, pg, run_state=run_state)
            run_state.last_saved_iteration = iteration
            progress.saved_checkpoint(iteration, run_state.floating_point_operations_so_far,
                                      run_state.consumed_train_samples)
        wait_for_pending_save()
    finally:
        exit_conditions.release()
    if stopped_early:
        progress.exiting()
        writers.close()
        return
    if args.do_valid:
        evaluate_and_print_results(f"iteration {iteration} on validation set", forward_step_func, valid_it,
                                   model, pg, iteration, writers, run_state=run_state)
    if args.do_test:
        evaluate_and_print_results(f"iteration {iteration} on test set", forward_step_func, test_it,
                                   model, pg, iteration, writers, label="test", run_state=run_state)
    run_state.publish(args)
    progress.exiting()
    writers.close()


def train_step(forward_step_func, data_iterator, model: List[torch.nn.Module], optimizer, scheduler,
               pg: ProcessGroups, iteration: int, validation: Optional[StepValidation] = None,
               forward_backward_func: Optional[Callable] = None, on_device: bool = False,
               before_optimizer: Optional[Callable[[], None]] = None) -> StepResult:
    """One global batch: forward/backward over its micro-batches, checks, optimizer step.

    ``forward_backward_func`` replaces the layout's schedule (a CUDA-graphed one).
    ``on_device``: the optimizer steps with no host sync and the result is pending (see
    ``StepResult.settle``); ``before_optimizer`` runs just before the optimizer step (the
    loop settles the previous step there, so the scheduler has set this step's rate)."""
    args = get_args()
    timers = get_timers()
    run = functools.partial(_forward_backward, forward_step_func, data_iterator, model, optimizer, pg,
                            forward_backward_func)
    verdict = Verdict.ACCEPT
    if validation is None:
        reported = run()
    else:
        verdict, reported = validation.run(iteration, run, model)
    if verdict is Verdict.STOP:
        return StepResult({}, True, None, None, stop=True)
    if args.fp8 and args.fp8_recipe == "delayed":
        # one scaling state on every data-parallel replica (the one checkpoints store)
        merge_over_replicas(model, pg.dp_cp, pg.expt_dp)
    losses = reduce_reported_losses(reported, pg) if pg.is_pipeline_last_stage() else {}
    if verdict is Verdict.SKIP:
        return StepResult(losses, True, None, None)
    if before_optimizer is not None:
        before_optimizer()
    set_phase("optimizer")
    increment = get_num_microbatches() * args.micro_batch_size * args.data_parallel_size
    timers("optimizer", log_level=1).start(barrier=args.barrier_with_L1_time)
    if on_device:
        outcome = optimizer.step_on_device()
        timers("optimizer", log_level=1).stop()
        empty_unused_memory(args, level=2)
        pending = HostCopy({**{f"loss:{key}": value for key, value in losses.items()}, **outcome.scalars()})
        return StepResult(losses, False, None, None, pending=pending, scheduler_increment=increment)
    update_successful, grad_norm, num_zeros = optimizer.step()
    timers("optimizer", log_level=1).stop()
    empty_unused_memory(args, level=2)
    if update_successful:
        scheduler.step(increment=increment)
    return StepResult(losses, not update_successful, grad_norm, num_zeros)


def steps_on_device(args, optimizer, validation: Optional[StepValidation]) -> bool:
    """Whether the loop takes its optimizer steps without host syncs (``step_on_device``)
    and reads each step's statistics back an iteration later, when the GPU is long past
    them: a fused optimizer without an fp16 loss scaler, and nothing that must look at the
    step's result before the next one starts -- no result validation (the NaN check, which
    re-runs a rejected iteration, and the spike checks) and no MoE or MTP per-layer
    metrics, which are read from trackers the next step overwrites."""
    return optimizer.can_step_on_device and validation is None and not args.num_experts and not args.mtp_num_layers


def _forward_backward(forward_step_func, data_iterator, model: List[torch.nn.Module], optimizer,
                      pg: ProcessGroups, forward_backward_func: Optional[Callable] = None) -> List[dict]:
    """Zero the gradients and run the step's micro-batches; returns their loss reports."""
    args = get_args()
    timers = get_timers()
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    timers("forward-backward", log_level=1).start(barrier=args.barrier_with_L1_time)
    schedule = forward_backward_func or get_forward_backward_func(pg, vp_size=len(model))
    reported = schedule(
        forward_step_func=forward_step_func,
        data_iterator=data_iterator,
        model=model,
        num_microbatches=get_num_microbatches(),
        seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size,
        forward_only=False,
        grad_scale_func=optimizer.scale_loss if args.fp16 else None,
        finalize_model_grads_func=lambda chunks, num_tokens: finalize_model_grads(chunks, num_tokens, pg),
        pg_collection=pg,
    )
    timers("forward-backward", log_level=1).stop()
    empty_unused_memory(args, level=1)
    return reported


def iterators_per_chunk(iterator, model: List[torch.nn.Module]):
    """The data iterator as the schedule wants it: itself for one model chunk, else a list
    with one entry per chunk (interleaved pipeline). Only the chunks that read data -- the
    one with the embedding and the one with the loss, or every chunk of a model whose every
    stage reads the micro-batch (BERT's padding mask) -- get the iterator; the others get
    None. Several reading chunks get views of the one stream (``itertools.tee``), so each
    sees every micro-batch in order and the data is still read once per rank."""
    if len(model) == 1:
        return iterator
    reads = [_reads_data(chunk) for chunk in model]
    if iterator is None or sum(reads) < 2:
        return [iterator if r else None for r in reads]
    views = iter(itertools.tee(iterator, sum(reads)))
    return [next(views) if r else None for r in reads]


def _reads_data(chunk: torch.nn.Module) -> bool:
    core = unwrap_model(chunk)
    if getattr(core, "every_stage_reads_data", False):
        return True
    return bool(getattr(core, "pre_process", True) or getattr(core, "post_process", True))


def _learning_rate(optimizer) -> Optional[float]:
    for group in optimizer.param_groups:
        if len(group["params"]) > 0:
            return group["lr"]
    return None


def train(forward_step_func, model, optimizer, scheduler, train_it, valid_it, pg: ProcessGroups, writers,
          exit_conditions: ExitConditions = None, progress: Optional[ProgressLog] = None,
          flops_func: Optional[Callable] = None, run_state: Optional[RunState] = None):
    """Iterate until --train-iters / --train-samples, saving every --save-interval;
    returns (last iteration, whether an exit condition stopped the run early).

    ``run_state`` holds the counters the loop advances (without one: a state started from
    the counters on ``args``); they are published onto ``args`` when the loop returns."""
    args = get_args()
    timers = get_timers()
    for chunk in model:
        chunk.train()
    run_state = run_state if run_state is not None else RunState.from_args(args)
    iteration = run_state.iteration
    flops_func = flops_func or num_floating_point_operations
    logger = TrainingLogger(args, writers, world_size=args.world_size, timers=timers, flops_func=flops_func,
                            run_state=run_state)
    first_of_run = True
    profiler = StepProfiler(args, dist.get_rank() if dist.is_initialized() else 0)
    manual_gc = ManualGC(args)
    static_scale = StaticLossScaleGuard(args, iteration)
    validation = build_step_validation(args)
    graphed_step = graphed_forward_backward(args, pg)
    start_hang_watchdog(args, dist.get_rank() if dist.is_initialized() else 0)
    train_it = validation.wrap(train_it) if validation is not None else train_it
    on_device = steps_on_device(args, optimizer, validation)
    steps = _StepLog(args, timers, logger, scheduler, optimizer, model, pg, static_scale, validation)
    if exit_conditions is not None:
        exit_conditions.lagged = on_device
    settle = steps.settle
    print_rank_0("> training ...")
    if on_device:
        print_rank_0("> the optimizer steps without host syncs; each step's loss and grad norm are read back "
                     "before the next step (at once where a line is printed, or before an evaluation or a save)")
    manual_gc.start()
    try:
        skip = set(args.iterations_to_skip or ())
        while _should_continue(args, run_state):
            update_num_microbatches(run_state.consumed_train_samples, consistency_check=True)
            if iteration + 1 in skip:
                settle()
                run_state.iteration = iteration = iteration + 1
                _skip_iteration(iteration, train_it, model, run_state)
                continue
            profiler.step_begin(iteration + 1)
            set_phase("forward-backward", iteration + 1)
            result = train_step(forward_step_func, train_it, model, optimizer, scheduler, pg, iteration + 1,
                                validation=validation, forward_backward_func=graphed_step,
                                on_device=on_device, before_optimizer=settle)
            if result.stop:
                if args.save and iteration > 0 and run_state.last_saved_iteration != iteration:
                    _save(run_state, model, optimizer, scheduler, pg, progress)
                wait_for_pending_save()
                stop_after_failed_validation(iteration + 1)
            run_state.iteration = iteration = iteration + 1
            profiler.step_end(iteration)
            run_state.consumed_train_samples += get_current_global_batch_size()
            steps.add(iteration, result, run_state.consumed_train_samples, get_current_global_batch_size(),
                      first_of_run)
            evaluating, saving, saving_non_persistent = _due_after(args, iteration)
            # A printed line, an evaluation or a save needs this step's values now; other
            # steps on the device are read back just before the next optimizer step.
            if (result.pending is None or first_of_run or iteration % args.log_interval == 0 or evaluating or saving
                    or saving_non_persistent):
                settle()
            first_of_run = False
            manual_gc.after_iteration(iteration)
            if evaluating:
                manual_gc.at_evaluation()
                set_phase("evaluation")
                evaluate_and_print_results(f"iteration {iteration}", forward_step_func, valid_it, model, pg,
                                           iteration, writers, run_state=run_state)
                manual_gc.at_evaluation()
            run_state.floating_point_operations_so_far += flops_func(args, get_current_global_batch_size())
            if saving:
                _save(run_state, model, optimizer, scheduler, pg, progress)
            elif saving_non_persistent:
                _save(run_state, model, optimizer, scheduler, pg, progress, non_persistent=True)
            reason = exit_conditions.reason(iteration) if exit_conditions is not None else None
            if reason is not None:
                settle()
                if args.save and run_state.last_saved_iteration != iteration:
                    _save(run_state, model, optimizer, scheduler, pg, progress)
                wait_for_pending_save()
                print_rank_0(f"exiting program at iteration {iteration}: {reason}")
                run_state.publish(args)
                return iteration, True
        settle()
        _finish_param_sync(model)
        run_state.publish(args)
        return iteration, False
    except Exception as error:
        log_failure(dist.get_rank() if dist.is_initialized() else 0, error)
        raise
    finally:
        manual_gc.stop()
        stop_hang_watchdog()


class _StepLog:
    """The loop's finished steps on their way to the logger: a step taken on the device waits
    here until ``settle()`` reads it back; then, in order, each advances the scheduler (if
    its update was applied) and is recorded, printing its line on a log iteration."""

    def __init__(self, args, timers, logger: TrainingLogger, scheduler, optimizer, model, pg: ProcessGroups,
                 static_scale: StaticLossScaleGuard, validation: Optional[StepValidation]) -> None:
        self.args, self.timers, self.logger, self.scheduler = args, timers, logger, scheduler
        self.optimizer, self.model, self.pg = optimizer, model, pg
        self.static_scale, self.validation = static_scale, validation
        self.unsettled: List[tuple] = []  # (iteration, result, consumed samples, global batch, first of run)
        self.interval_start = time.time()

    def add(self, iteration: int, result: StepResult, consumed: int, global_batch: int, first: bool) -> None:
        self.unsettled.append((iteration, result, consumed, global_batch, first))

    def settle(self) -> None:
        """Read back the steps taken on the device, in order, and log them."""
        args = self.args
        while self.unsettled:
            step, result, consumed, global_batch, first = self.unsettled.pop(0)
            result.settle(self.scheduler)
            self.static_scale.step(step, result.skipped)
            logged = first or step % args.log_interval == 0
            stats = _iteration_stats(result, self.optimizer, self.model, self.pg, logged, global_batch)
            stats.rejected_results = self.validation.log_counter if self.validation is not None else None
            if self.logger.record(step, stats, consumed, time.time() - self.interval_start, first) is not None:
                _after_log(args, self.timers, step, first)
                self.interval_start = time.time()


def _due_after(args, iteration: int) -> tuple:
    """(evaluate, save, save non-persistent) after ``iteration``: a persistent save takes the
    place of a non-persistent one due at the same iteration (as in Megatron)."""
    evaluating = bool(args.eval_interval and iteration % args.eval_interval == 0 and args.do_valid
                      and (args.start_eval_at_iter is None or iteration >= args.start_eval_at_iter))
    saving = bool(args.save and args.save_interval and iteration % args.save_interval == 0)
    saving_non_persistent = bool(not saving and args.save and args.non_persistent_save_interval
                                 and iteration % args.non_persistent_save_interval == 0)
    return evaluating, saving, saving_non_persistent


def _iteration_stats(result: StepResult, optimizer, model, pg: ProcessGroups, logged: bool,
                     global_batch_size: int) -> IterationStats:
    """What the logger gets for one step; the parameter norm (--log-params-norm) only on the
    iterations whose line is printed."""
    params_norm = None
    if get_args().log_params_norm and logged:
        _finish_param_sync(model)  # the norm reads the updated weights
        params_norm = params_l2_norm(model, pg)
    return IterationStats(
        losses=result.losses,
        skipped=result.skipped,
        grad_norm=result.grad_norm,
        num_zeros=result.num_zeros,
        learning_rate=_learning_rate(optimizer),
        loss_scale=optimizer.loss_scale_for_log(),
        global_batch_size=global_batch_size,
        params_norm=params_norm,
    )


def _skip_iteration(iteration: int, train_it, model: List[torch.nn.Module], run_state: RunState) -> None:
    """--iterations-to-skip: read and drop the iteration's global batch, as its training step
    would have read it (on the ranks and model chunks that read data, one sample batch per
    micro-batch), so later iterations get the same data as without the skip. No forward, no
    update, no learning-rate step, no log line (Megatron's behaviour)."""
    iterators = train_it if isinstance(train_it, list) else [train_it] * len(model)
    readers = {id(it): it for it, chunk in zip(iterators, model) if it is not None and _reads_data(chunk)}
    for _ in range(get_num_microbatches()):
        for data_iterator in readers.values():
            next(data_iterator)
    batch = get_current_global_batch_size()
    run_state.consumed_train_samples += batch
    run_state.skipped_train_samples += batch
    print_rank_0(f" skipped iteration {iteration} (--iterations-to-skip): its {batch} samples were read and dropped")


def _finish_param_sync(model) -> None:
    # With --overlap-param-gather the next step's parameter all-gather is in flight:
    # finish it so that whatever reads the weights next (evaluation, a checkpoint) sees them.
    for chunk in model:
        if hasattr(chunk, "finish_param_sync"):
            chunk.finish_param_sync()


def _save(run_state: RunState, model, optimizer, scheduler, pg: ProcessGroups,
          progress: Optional[ProgressLog] = None, non_persistent: bool = False) -> None:
    """Save the run at ``run_state.iteration``; ``non_persistent``: a global non-persistent
    checkpoint (--non-persistent-save-interval), which the exit and the end of training do
    not count as saved (they still write a persistent one)."""
    args = get_args()
    _finish_param_sync(model)
    timers = get_timers()
    set_phase("checkpoint save")
    iteration, flops = run_state.iteration, run_state.floating_point_operations_so_far
    timers("save-checkpoint", log_level=0).start(barrier=True)
    save_checkpoint(iteration, model, optimizer, scheduler, flops, args, pg, run_state=run_state,
                    non_persistent=non_persistent)
    timers("save-checkpoint", log_level=0).stop(barrier=True)
    if non_persistent:
        return
    run_state.last_saved_iteration = iteration
    if progress is not None:
        progress.saved_checkpoint(iteration, flops, run_state.consumed_train_samples)


def _should_continue(args, run_state: RunState) -> bool:
    if args.train_samples:
        return run_state.consumed_train_samples < args.train_samples
    return run_state.iteration < args.train_iters


def _after_log(args, timers, iteration: int, first_of_run: bool) -> None:
    if first_of_run:
        report = memory_report(dist.get_rank() if dist.is_initialized() else 0, iteration)
        # A --fake-process-group process prints it whatever rank it plays: the peak is what it measures.
        if report and (not dist.is_initialized() or parallel_state.get_data_parallel_rank() == 0 or is_fake()):
            print(report, flush=True)
    if args.timing_log_level > 0:
        block = timers.log_string(["forward-backward", "optimizer"], normalizer=1.0)
        if block:
            print_rank_last(block)
