"""``save_checkpoint`` / ``load_checkpoint``: Megatron's entry points over every format,
with the crash-safe publishing of ``directory`` and the integrity checks of ``manifest``.

Each entry point opens one ``CheckpointComm`` (a gloo group over all ranks) and passes
its group to every collective; it is closed when the entry point's work is done.

Save is plan -> write -> commit, with one object per format in ``save_formats``: all
ranks agree that the iteration is not already committed, rank 0 makes the
staging directory, every rank writes its part (in a background thread with
--async-save, from a CPU snapshot), the ranks' file checksums are gathered, rank 0 writes
the manifest (and for torch_dist Megatron's ``metadata.json``), renames the directory into
place, and after every rank has seen the commit, updates the tracker file and removes
checkpoints beyond --keep-last-checkpoints. Any failure (a full disk) removes the staging
directory and raises on every rank; the previous checkpoint is untouched.

Load: the tracker (or --ckpt-step) picks the iteration, the files are verified against
the manifest (split over the ranks), the model/optimizer keys and shapes are compared
with the checkpoint, and only then is anything read into the model.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import threading
import time
from typing import Callable, List, Optional, Tuple

from torch.distributed.checkpoint.api import CheckpointException as WriterException

from megatron.core import parallel_state
from megatron.core.process_groups import ProcessGroups
from megatron.training.checkpointing import directory as layout
from megatron.training.checkpointing import (
    fsdp_dtensor_format,
    local_checkpoints,
    megatron_lm,
    torch_dcp_format,
    torch_dist_format,
    torch_format,
)
from megatron.training.checkpointing.collectives import (
    CheckpointComm,
    all_gather_objects,
    barrier,
    broadcast_from_rank0,
)
from megatron.training.checkpointing.directory import NON_PERSISTENT_SUBDIR, CheckpointError
from megatron.training.checkpointing.faults import FaultHook, crash_point
from megatron.training.checkpointing.free_space import check_free_space, free_bytes
from megatron.training.checkpointing.manifest import (
    MANIFEST_FILENAME,
    MEGATRON_LM_KEY_LAYOUT,
    checksums,
    read_manifest,
    verify_files,
    write_manifest,
)
from megatron.training.checkpointing.run_state import (
    describe_layout,
    parallel_layout,
    saved_counters,
    restore_grad_scaler,
    restore_param_group_hyperparameters,
    restore_rng,
)
from megatron.training.checkpointing.save_formats import SAVE_FORMATS, SaveRequest, planner_for
from megatron.training.global_vars import get_args
from megatron.training.rank_print import print_rank_0
from megatron.training.run_state import RunState

logger = logging.getLogger(__name__)



class _PendingSave:
    """The background write of --async-save; its error surfaces at the next wait."""

    def __init__(self) -> None:
        self.thread: Optional[threading.Thread] = None
        self.error: Optional[BaseException] = None

    def start(self, work: Callable[[], None]) -> None:
        def run() -> None:
            try:
                work()
            except BaseException as error:  # noqa: BLE001 -- handed to the training thread
                self.error = error

        self.thread = threading.Thread(target=run, name="checkpoint-writer", daemon=True)
        self.thread.start()

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


_PENDING = _PendingSave()


def wait_for_pending_save() -> None:
    """Block until an --async-save write has committed (re-raising its error)."""
    _PENDING.wait()


def _groups(pg: Optional[ProcessGroups]) -> ProcessGroups:
    return pg if pg is not None else parallel_state.get_process_groups()


def non_persistent_root(args, base: Optional[str]) -> str:
    """Where global non-persistent checkpoints of the run saving to (or loading from)
    ``base`` live: --non-persistent-global-ckpt-dir, else ``<base>/non_persistent``."""
    return args.non_persistent_global_ckpt_dir or os.path.join(base, NON_PERSISTENT_SUBDIR)


def save_checkpoint(iteration: int, model: List, optimizer, scheduler, num_floating_point_operations_so_far: float = 0,
                    args=None, pg: Optional[ProcessGroups] = None, fault_hook: Optional[FaultHook] = None, *,
                    run_state: Optional[RunState] = None, non_persistent: bool = False) -> bool:
    """Save under ``args.save``; collective over all ranks. Returns False when a
    committed checkpoint of this iteration already exists (it is never overwritten).

    ``non_persistent``: a non-persistent checkpoint (--non-persistent-save-interval). A
    global one is saved under ``non_persistent_root`` with its own tracker; before it is
    written, every older one there but the newest is deleted (as Megatron does), and
    --keep-last-checkpoints and --save-retain-interval do not apply. A local or in_memory
    one is each rank's own state, on node-local disk or in host memory
    (``local_checkpoints``), written synchronously.

    ``run_state`` (the training loop's counters) is stored in the checkpoint's copy of
    ``args``, under Megatron's names; without it, the counters already on ``args`` are stored.

    ``fault_hook(phase, rank, iteration)`` runs at each crash point of the save (see
    ``faults``); the default is ``faults.crash_point``, driven by MEGATRON_CKPT_CRASH."""
    args = args if args is not None else get_args()
    if run_state is not None:
        args = run_state.stamped_args(args)
    hook = fault_hook if fault_hook is not None else crash_point
    groups = _groups(pg)
    wait_for_pending_save()
    if non_persistent and getattr(args, "non_persistent_ckpt_type", None) in local_checkpoints.KINDS:
        local_checkpoints.save(iteration, model, optimizer, scheduler, num_floating_point_operations_so_far, args,
                               hook)
        return True
    if args.ckpt_format not in SAVE_FORMATS:
        raise CheckpointError(f"--ckpt-format {args.ckpt_format}: saving supports {', '.join(SAVE_FORMATS)}")
    start = time.time()
    root = non_persistent_root(args, args.save) if non_persistent else args.save
    retention = (None, None) if non_persistent else (getattr(args, "keep_last_checkpoints", None),
                                                     getattr(args, "save_retain_interval", None))
    comm = CheckpointComm.open()
    try:
        if non_persistent and comm.rank == 0:
            removed = layout.keep_only_newest(root)
            if removed:
                print_rank_0(f"  removed old non-persistent checkpoints of iterations {removed} from {root}")
        plan = _plan_save(iteration, model, optimizer, scheduler, num_floating_point_operations_so_far, args,
                          groups, comm, hook, root)
    except BaseException:
        comm.close()
        raise
    if plan is None:
        comm.close()
        return False
    background = bool(getattr(args, "async_save", False))

    def finish() -> None:
        try:
            _write_and_commit(plan, args, root, iteration, comm, hook, retention)
        finally:
            comm.close()
        print_rank_0(f"  successfully saved checkpoint from iteration {iteration:7d} to {root} "
                     f"({time.time() - start:.1f} s{', in the background' if background else ''})")

    if background:
        _PENDING.start(finish)
    else:
        finish()
    return True


def _plan_save(iteration: int, model: List, optimizer, scheduler, num_flops: float, args, groups: ProcessGroups,
               comm: CheckpointComm, hook: FaultHook, root: str):
    """Agree the iteration is new, make the staging directory under ``root`` and build what
    each rank writes (checking room for it); None when the iteration is already committed."""
    rank, group = comm.rank, comm.group
    final = layout.iteration_dir(root, iteration)
    if broadcast_from_rank0(os.path.isdir(final) if rank == 0 else None, group):
        print_rank_0(f"  checkpoint {final} already exists: not overwriting a committed checkpoint")
        return None
    print_rank_0(f"saving checkpoint at iteration {iteration:7d} to {root} in {args.ckpt_format} format")
    if rank == 0:
        layout.prepare_staging(root, iteration)
    barrier(group)
    hook("before_shards", rank, iteration)
    megatron_layout = bool(getattr(args, "ckpt_megatron_lm_layout", False))
    if megatron_layout:
        print_rank_0("  in Megatron-LM's key layout (--ckpt-megatron-lm-layout): model weights only")
    request = SaveRequest(args, iteration, model, optimizer, scheduler, num_flops, groups, rank,
                          to_cpu=bool(getattr(args, "async_save", False)))
    plan = planner_for(args.ckpt_format, megatron_layout).plan(request)
    needed = plan.bytes_needed(group)
    if needed is not None:
        _refuse_without_room(root, iteration, needed, rank, group)
    return plan


def _refuse_without_room(root: str, iteration: int, needed: int, rank: int, group) -> None:
    """Before writing: rank 0 reads the free space and every rank decides alike."""
    free, previous = broadcast_from_rank0((free_bytes(root), layout.read_tracker(root)[0]) if rank == 0 else None,
                                          group)
    try:
        check_free_space(root, iteration, needed, free, previous)
    except CheckpointError:
        barrier(group)
        if rank == 0:
            shutil.rmtree(layout.staging_dir(root, iteration), ignore_errors=True)
        raise


def _write(plan, staging: str, comm: CheckpointComm, iteration: int, hook: FaultHook) -> Tuple[dict, Optional[str]]:
    """This rank's (file checksums, error description): a failure is returned, not raised,
    so that every rank learns of it in the gather that follows."""
    rank = comm.rank

    def mid_shard() -> None:
        hook("mid_shard", rank, iteration)

    try:
        return checksums(staging, plan.write(staging, comm.group, rank, mid_shard)), None
    except (Exception, WriterException) as caught:  # noqa: BLE001 -- every rank must learn of it
        # torch.distributed.checkpoint reports a failed write (a full disk) as a
        # BaseException subclass, so it needs naming here beside Exception.
        return {}, _describe_write_error(caught, rank)


def _write_and_commit(plan, args, root: str, iteration: int, comm: CheckpointComm, hook: FaultHook,
                      retention: Tuple[Optional[int], Optional[int]]) -> None:
    """Write, gather every rank's checksums (or errors), and commit on rank 0: the
    manifest, the rename into place and, once every rank has seen it, the tracker; then
    the retention (--keep-last-checkpoints, --save-retain-interval) given in ``retention``."""
    rank, group = comm.rank, comm.group
    staging = layout.staging_dir(root, iteration)
    sums, error = _write(plan, staging, comm, iteration, hook)
    hook("after_shards", rank, iteration)
    gathered = all_gather_objects((sums, error), group)
    errors = list(dict.fromkeys(e for _, e in gathered if e))  # the writer reports a failure on every rank
    if errors:
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        previous = layout.read_tracker(root)[0]
        raise CheckpointError(
            f"saving the checkpoint of iteration {iteration} to {root} failed and was discarded "
            f"({'; '.join(errors[:4])}). {_free_space(root)}The previous checkpoint "
            f"({'iteration ' + str(previous) if previous is not None else 'none'}) is untouched. "
            "Free space or point --save elsewhere."
        )
    if rank == 0:
        files = {name: entry for ranks_sums, _ in gathered for name, entry in ranks_sums.items()}
        files.update(checksums(staging, plan.commit_files(staging)))
        key_layout = MEGATRON_LM_KEY_LAYOUT if getattr(args, "ckpt_megatron_lm_layout", False) else None
        write_manifest(staging, args.ckpt_format, iteration, parallel_layout(args), files, key_layout)
        layout.commit(root, iteration)
    barrier(group)
    hook("after_commit", rank, iteration)
    barrier(group)
    if rank == 0:
        layout.write_tracker(root, iteration)
        removed = layout.remove_old_checkpoints(root, retention[0], retention[1], iteration)
        if removed:
            print_rank_0(f"  removed old checkpoints of iterations {removed}")


def _free_space(root: str) -> str:
    """A sentence on the space left under ``root``: a full disk often surfaces only as an
    obscure serializer error ("unexpected pos ..."), which hides the cause."""
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        return ""
    return f"Free space left on the file system of {root}: {free / 2**20:.1f} MiB. "


def _describe_write_error(caught: BaseException, rank: int) -> str:
    """``rank N: Type: message`` per failing rank; the collective writer names the ranks
    that failed (the same on every rank), and its own message carries whole tracebacks."""
    if isinstance(caught, WriterException):
        return "; ".join(f"rank {failed}: {type(exc).__name__}: {exc}"
                         for failed, (exc, _) in sorted(caught.failures.items()))
    return f"rank {rank}: {type(caught).__name__}: {caught}"


def _gather_problems(group) -> Callable[[str], List[str]]:
    """A collective over ``group`` that hands every rank the list of all ranks' problems."""
    return functools.partial(all_gather_objects, group=group)


def _resolve_load_target(args, rank: int, group) -> Tuple[Optional[str], Optional[int], bool, bool]:
    """(root, iteration, release, finetune) to load, or (None, ...) when neither --load nor
    --pretrained-checkpoint has a checkpoint."""
    finetune = bool(args.finetune)
    for root, pretrained in ((args.load, False), (getattr(args, "pretrained_checkpoint", None), True)):
        if not root:
            continue
        _refuse_missing_directory(root, args, pretrained, rank, group)
        iteration, release = _newest(root, args, rank, group)
        if args.ckpt_step is not None and not pretrained:
            iteration, release = args.ckpt_step, False
        elif not pretrained and getattr(args, "non_persistent_ckpt_type", None) == "global":
            root, iteration, release = _newer_non_persistent(args, root, iteration, release, rank, group)
        if iteration is not None:
            return root, iteration, release, finetune or pretrained or release
    return None, None, False, finetune


def _nothing_to_load(args) -> None:
    """No checkpoint anywhere: refuse with --exit-on-missing-checkpoint, else say so."""
    if getattr(args, "exit_on_missing_checkpoint", False):
        raise CheckpointError(f"--load {args.load}: no checkpoint found (no {layout.TRACKER_FILENAME}) and "
                              "--exit-on-missing-checkpoint is set")
    print_rank_0(f"WARNING: could not find a checkpoint in --load {args.load} "
                 f"(no {layout.TRACKER_FILENAME}); training starts from the initial weights")


def _load_local_if_newer(model: List, optimizer, scheduler, args, comm: CheckpointComm, root: Optional[str],
                         iteration: Optional[int], release: bool) -> Optional[Tuple[int, float, dict]]:
    """--non-persistent-ckpt-type local / in_memory: the non-persistent checkpoint instead of
    the persistent one of --load when it is at least as new (not with --ckpt-step or
    --finetune, which name what to load). None: load ``root`` (or nothing)."""
    if getattr(args, "non_persistent_ckpt_type", None) not in local_checkpoints.KINDS:
        return None
    if not args.load or args.ckpt_step is not None or args.finetune:
        return None
    persistent = iteration if root is not None and _same_path(root, args.load) else None
    return local_checkpoints.load_if_newer(model, optimizer, scheduler, args, comm, persistent,
                                           release and persistent is not None)


def _newest(root: str, args, rank: int, group) -> Tuple[Optional[int], bool]:
    """(iteration, release) of the checkpoint ``root``'s tracker names (rank 0 reads, all agree)."""
    def read():
        try:
            iteration, release, warning = layout.newest_checkpoint(root)
            return (iteration, release), warning, None
        except CheckpointError as error:
            return (None, False), None, str(error)

    (iteration, release), warning, error = broadcast_from_rank0(read() if rank == 0 else None, group)
    if error:
        raise CheckpointError(error)
    if warning and args.ckpt_step is None:
        print_rank_0(f"WARNING: {warning}")
    return iteration, release


def _newer_non_persistent(args, root: str, iteration: Optional[int], release: bool, rank: int, group):
    """--non-persistent-ckpt-type global: the non-persistent checkpoint instead of the
    persistent one when it is at least as new (Megatron's rule); (root, iteration, release)."""
    other = non_persistent_root(args, root)
    if not broadcast_from_rank0(os.path.isdir(other) if rank == 0 else None, group):
        return root, iteration, release
    other_iteration, _ = _newest(other, args, rank, group)
    if other_iteration is None or (iteration is not None and (release or other_iteration < iteration)):
        return root, iteration, release
    print_rank_0(f"  the non-persistent checkpoint of iteration {other_iteration} in {other} is the newest "
                 f"(persistent: {'none' if iteration is None else iteration}): loading it")
    return other, other_iteration, False


def _same_path(a: Optional[str], b: Optional[str]) -> bool:
    return bool(a) and bool(b) and os.path.abspath(a) == os.path.abspath(b)


def _refuse_missing_directory(root: str, args, pretrained: bool, rank: int, group) -> None:
    """A --load (or --pretrained-checkpoint) directory that does not exist is a typo,
    except where --load is also --save: the first run of a job that resumes itself.
    Megatron starts from scratch in both cases; silently discarding the intended
    weights costs a whole run, so this is refused."""
    if not pretrained and _same_path(root, args.save):
        return
    if broadcast_from_rank0(os.path.exists(root) if rank == 0 else None, group):
        return
    flag = "--pretrained-checkpoint" if pretrained else "--load"
    raise CheckpointError(f"{flag} {root}: no such directory. Check the path; to start from scratch leave "
                          f"{flag} out (or make it the same directory as --save, for a run that resumes itself)")


def check_save_directory(args, start_iteration: int) -> None:
    """Refuse a run whose --save already holds committed checkpoints of later iterations
    than it starts from (a fresh run, or --ckpt-step rewinding, into a used directory):
    its saves of those iterations would be skipped (a committed checkpoint is never
    overwritten) and the tracker would move backwards. Collective."""
    if not args.save:
        return
    roots = [("--save", args.save)]
    if getattr(args, "non_persistent_ckpt_type", None) == "global":
        roots.append(("--save's non-persistent directory", non_persistent_root(args, args.save)))
    for flag, root in roots:
        _refuse_later_checkpoints(flag, root, start_iteration, args.save)


def _refuse_later_checkpoints(flag: str, root: str, start_iteration: int, save: str) -> None:
    comm = CheckpointComm.open()
    try:
        committed = layout.committed_iterations(root) if comm.rank == 0 else None
        later = [i for i in broadcast_from_rank0(committed, comm.group) if i > start_iteration]
    finally:
        comm.close()
    if later:
        raise CheckpointError(
            f"{flag} {root} holds committed checkpoints of iterations {later[-5:]}, later than this run "
            f"starts from (iteration {start_iteration}); its own saves would be skipped and the tracker "
            f"would move backwards. Resume with --load {save}, choose an empty --save directory, or "
            "move those iter_* directories away"
        )


def _verify(directory: str, rank: int, world: int, group) -> Optional[dict]:
    manifest = read_manifest(directory)
    if manifest is None:
        print_rank_0(f"WARNING: {directory} has no {MANIFEST_FILENAME} (a checkpoint written by another program, "
                     "such as Megatron-LM): its files cannot be checked for corruption; keys and shapes are "
                     "still compared")
    problems = verify_files(directory, manifest, rank, world) if manifest else []
    gathered = [p for rank_problems in all_gather_objects(problems, group) for p in rank_problems]
    if gathered:
        raise CheckpointError(
            f"checkpoint {directory} is damaged; nothing was loaded:\n  " + "\n  ".join(gathered)
            + "\nLoad an earlier iteration with --ckpt-step N (committed: "
            + f"{layout.committed_iterations(os.path.dirname(directory))[-5:]})."
        )
    return manifest


def load_checkpoint(model: List, optimizer, scheduler, args=None, pg: Optional[ProcessGroups] = None, *,
                    run_state: Optional[RunState] = None) -> Tuple[int, float]:
    """Load from --load (or --pretrained-checkpoint) into the live model, optimizer and
    scheduler. Returns (iteration, FLOPs so far).

    The data position (consumed samples) and the counters go into ``run_state`` when given
    (the training loop's), else onto ``args`` (Megatron's tools and scripts read them there).
    """
    args = args if args is not None else get_args()
    groups = _groups(pg)
    wait_for_pending_save()
    comm = CheckpointComm.open()
    try:
        iteration, flops, counters = _load(model, optimizer, scheduler, args, groups, comm)
    finally:
        comm.close()
    if run_state is None:
        for name, value in counters.items():
            setattr(args, name, value)
    else:
        run_state.restore_sample_counters(counters)
        run_state.iteration, run_state.floating_point_operations_so_far = iteration, flops
    return iteration, flops


def _load(model: List, optimizer, scheduler, args, groups: ProcessGroups, comm: CheckpointComm
          ) -> Tuple[int, float, dict]:
    """(iteration, FLOPs so far, sample counters) of the loaded checkpoint."""
    rank, world, group = comm.rank, comm.world, comm.group
    root, iteration, release, finetune = _resolve_load_target(args, rank, group)
    local = _load_local_if_newer(model, optimizer, scheduler, args, comm, root, iteration, release)
    if local is not None:
        return local
    if root is None:
        _nothing_to_load(args)
        return 0, 0.0, {}
    directory = layout.iteration_dir(root, iteration, release)
    if rank == 0:
        layout.warn_about_partial_checkpoints(root)
    if not broadcast_from_rank0(os.path.isdir(directory) if rank == 0 else None, group):
        raise CheckpointError(
            f"{directory} does not exist (named by {layout.tracker_path(root)} or --ckpt-step); committed "
            f"checkpoints in {root}: {layout.committed_iterations(root)[-5:]}. Pass --ckpt-step N for one of them."
        )
    manifest = _verify(directory, rank, world, group)
    # ``load_checkpoint(model, None, None)`` is Megatron's evaluation / generation pattern: weights only.
    load_optim = not args.no_load_optim and not finetune and optimizer is not None
    wants_rng = not args.no_load_rng and not finetune
    print_rank_0(f"loading checkpoint from {root} at iteration {iteration}")
    torch_dcp_format.refuse_format_mismatch(directory, model, (manifest or {}).get("ckpt_format", "non-torch_dcp"))
    if args.load_main_params_from_ckpt and not (torch_dist_format.is_torch_dist_checkpoint(directory)
                                                or fsdp_dtensor_format.holds_torch_dist_layout(directory)):
        raise CheckpointError(f"--load-main-params-from-ckpt reads torch_dist checkpoints; {directory} is in another "
                              "format. Drop the flag (the fp32 main params then start from the loaded weights)")
    if megatron_lm.is_megatron_checkpoint(directory):
        common = megatron_lm.load(directory, model, groups, args, _gather_problems(group), group)
        load_optim, load_rng, rng = False, False, None
        print_rank_0("  a checkpoint in Megatron-LM's layout: model weights loaded; its optimizer and RNG states "
                     "are not read (training continues with a fresh optimizer)")
    elif (torch_dist_format.is_torch_dist_checkpoint(directory)
          or fsdp_dtensor_format.holds_torch_dist_layout(directory)):
        common = torch_dist_format.read_common(directory, group)
        load_optim = load_optim and common.get("optimizer_saved", True)
        load_rng = wants_rng and common.get("rng_saved", True) and _same_layout(common.get("layout"), args)
        rng = torch_dist_format.load(directory, model, optimizer, groups, rank, load_optim, load_rng, common,
                                     _gather_problems(group), group, args)
        if load_optim:
            restore_grad_scaler(optimizer, common["optimizer"].get("grad_scaler"))
            restore_param_group_hyperparameters(optimizer, common["optimizer"].get("param_groups"))
            if scheduler is not None and common.get("opt_param_scheduler") is not None:
                scheduler.load_state_dict(common["opt_param_scheduler"])
    elif torch_format.is_torch_checkpoint(directory):
        common, rng = torch_format.load(directory, manifest, model, optimizer, groups, args, load_optim,
                                        _gather_problems(group))
        load_optim = load_optim and common.get("optimizer") is not None
        load_rng = wants_rng and rng is not None and _same_layout(common.get("layout"), args)
        if load_optim and scheduler is not None and common.get("opt_param_scheduler") is not None:
            scheduler.load_state_dict(common["opt_param_scheduler"])
    elif torch_dcp_format.is_torch_dcp_checkpoint(directory):
        common, rng = torch_dcp_format.load(directory, model, optimizer, groups, rank, load_optim, wants_rng,
                                            _gather_problems(group), group)
        load_optim = common["optimizer_loaded"]
        load_rng = wants_rng and rng is not None and _same_layout(common.get("layout"), args)
        if load_optim and scheduler is not None and common.get("opt_param_scheduler") is not None:
            scheduler.load_state_dict(common["opt_param_scheduler"])
    else:
        raise CheckpointError(f"{directory} is neither a torch_dist checkpoint (no valid metadata.json) nor a "
                              "torch checkpoint (no mp_rank_* directories) nor a torch_dcp one (no .metadata)")
    main_params_read = bool(args.load_main_params_from_ckpt and optimizer is not None and not load_optim)
    if not load_optim and optimizer is not None and not main_params_read:
        # The fp32 main params must start from the loaded weights, not the initial ones.
        optimizer.reload_model_params()
    if load_rng and rng is not None:
        restore_rng(rng)
    elif wants_rng:
        print_rank_0("  RNG state not restored (not saved, or the parallel layout changed)")
    iteration, counters = saved_counters(args, common, finetune)
    print_rank_0(f"  successfully loaded checkpoint from {root} at iteration {iteration}")
    flops = float(common.get("num_floating_point_operations_so_far", 0.0)) if not finetune else 0.0
    return iteration, flops, counters


def _same_layout(saved: Optional[dict], args) -> bool:
    if not saved:
        return False
    same = saved == parallel_layout(args)
    if not same:
        print_rank_0(f"  checkpoint layout {describe_layout(saved)}; this run {describe_layout(parallel_layout(args))}")
    return same


def convert_checkpoint_format(model: List, optimizer, scheduler, args, pg: Optional[ProcessGroups] = None, *,
                              run_state: Optional[RunState] = None) -> str:
    """--ckpt-convert-format: save the loaded state again, in that format, under
    ``<--ckpt-convert-save>/<format>`` at the loaded iteration (``run_state``'s, else the one
    on ``args``); returns that directory."""
    state = run_state if run_state is not None else RunState.from_args(args)
    target = os.path.join(args.ckpt_convert_save, args.ckpt_convert_format)
    saved_root, saved_format = args.save, args.ckpt_format
    args.save, args.ckpt_format = target, args.ckpt_convert_format
    try:
        save_checkpoint(state.iteration, model, optimizer, scheduler, state.floating_point_operations_so_far,
                        args, pg, run_state=state)
        wait_for_pending_save()
    finally:
        args.save, args.ckpt_format = saved_root, saved_format
    return target
