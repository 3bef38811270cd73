"""Non-persistent checkpoints outside --save: node-local files (--non-persistent-ckpt-type
local, ``local_store``) and host-memory copies (--non-persistent-ckpt-type in_memory).

Both hold each rank's own state (``local_state``), saved every --non-persistent-save-interval
iterations; only the newest is kept. On load (--load), the newest usable one is taken when
its iteration is at least the persistent checkpoint's (Megatron's rule, as for global
non-persistent checkpoints); every rank must have it, saved under this run's parallel layout
and world size, or the persistent checkpoint is loaded and a line says why.

in_memory keeps the copy in this Python process (a deep copy on the CPU); this framework has
no in-process restart of its own (restarts come from the launcher, which starts new
processes), so it serves a job that handles a failure inside its process: a driver that
catches the error, resets the process's globals (``unset_global_variables``,
``destroy_num_microbatches_calculator``) and calls ``pretrain`` again with a --load. The
copy is found by the --save directory of the run that kept it: a load whose --load is that
directory considers it. A new process starts without one.
"""

from __future__ import annotations

import os
import time
from typing import Dict, List, Optional, Tuple

from megatron.training.checkpointing import local_store
from megatron.training.checkpointing.collectives import CheckpointComm, all_gather_objects
from megatron.training.checkpointing.faults import FaultHook
from megatron.training.checkpointing.local_state import (
    apply_local_state,
    build_local_state,
    cpu_copy,
    model_problems,
)
from megatron.training.checkpointing.run_state import describe_layout, parallel_layout
from megatron.training.rank_print import print_rank_0

KINDS = ("local", "in_memory")

# in_memory: abspath of the run's --save -> {"iteration": int, "state": this rank's state on the CPU}
_IN_MEMORY: Dict[str, dict] = {}


def save(iteration: int, model: List, optimizer, scheduler, num_flops: float, args, hook: FaultHook) -> None:
    """Save this rank's state as the local or in-memory non-persistent checkpoint of
    ``iteration`` (``args`` stamped with the run's counters); collective for local."""
    start = time.time()
    state = build_local_state(args, iteration, model, optimizer, scheduler, num_flops)
    if args.non_persistent_ckpt_type == "in_memory":
        _IN_MEMORY[os.path.abspath(args.save)] = {"iteration": iteration, "state": cpu_copy(state)}
        print_rank_0(f"  kept the in-memory non-persistent checkpoint of iteration {iteration:7d} "
                     f"({time.time() - start:.1f} s)")
        return
    comm = CheckpointComm.open()
    try:
        local_store.save(state, iteration, args, comm, hook)
    finally:
        comm.close()
    copies = f", {args.replication_factor} copies of each" if args.replication else ""
    print_rank_0(f"  saved the local non-persistent checkpoint of iteration {iteration:7d} to "
                 f"{args.non_persistent_local_ckpt_dir}{copies} ({time.time() - start:.1f} s)")


def _in_memory_iteration(args, comm: CheckpointComm) -> Optional[int]:
    """The iteration of the in-memory checkpoint every rank holds for --load, or None (with
    a line saying why when some rank holds one that cannot be used). Collective."""
    kept = _IN_MEMORY.get(os.path.abspath(args.load)) if args.load else None
    mine = None if kept is None else (kept["iteration"], kept["state"]["layout"])
    gathered = all_gather_objects(mine, comm.group)
    if all(entry is None for entry in gathered):
        return None
    iterations = {entry[0] for entry in gathered if entry is not None}
    if None in gathered or len(iterations) > 1:
        print_rank_0(f"  the ranks hold in-memory non-persistent checkpoints of different iterations "
                     f"({[None if e is None else e[0] for e in gathered][:8]}): not used")
        return None
    here = parallel_layout(args)
    other = next((entry[1] for entry in gathered if entry[1] != here), None)
    if other is not None:
        print_rank_0(f"  WARNING: the in-memory non-persistent checkpoint was kept with {describe_layout(other)}; "
                     f"this run has {describe_layout(here)}: it is ignored")
        return None
    return iterations.pop()


def load_if_newer(model: List, optimizer, scheduler, args, comm: CheckpointComm, persistent: Optional[int],
                  release: bool) -> Optional[Tuple[int, float, dict]]:
    """Load the local or in-memory non-persistent checkpoint when it is usable and at least
    as new as the ``persistent`` iteration (None: there is none; ``release``: a release
    checkpoint, which is taken instead). Returns (iteration, FLOPs so far, sample counters),
    or None when the persistent checkpoint (if any) is to be loaded. Collective."""
    kind = args.non_persistent_ckpt_type
    if kind == "local":
        iteration, inventories = local_store.find(args, comm)
    else:
        iteration, inventories = _in_memory_iteration(args, comm), None
    if iteration is None:
        return None
    described = f"the {kind} non-persistent checkpoint of iteration {iteration}"
    if persistent is not None and (release or iteration < persistent):
        print_rank_0(f"  {described} is older than the persistent one "
                     f"({'release' if release else persistent}): loading the persistent one")
        return None
    if kind == "local":
        state = local_store.read(args, iteration, inventories, comm)
    else:
        # A copy: loading aliases the optimizer's state to these tensors, which training changes.
        state = cpu_copy(_IN_MEMORY[os.path.abspath(args.load)]["state"])
    fallback = "loading the persistent checkpoint" if persistent is not None else "starting without it"
    if state is None:
        print_rank_0(f"  {fallback}")
        return None
    problems = [p for rank_problems in all_gather_objects(model_problems(state, model), comm.group)
                for p in rank_problems]
    if problems:
        print_rank_0(f"  WARNING: {described} does not fit this model ({'; '.join(sorted(set(problems))[:4])}): "
                     f"{fallback}")
        return None
    print_rank_0(f"loading {described} (persistent: {'none' if persistent is None else persistent})")
    iteration, flops, counters, note = apply_local_state(
        state, model, optimizer, scheduler, args,
        load_optim=not args.no_load_optim and optimizer is not None, load_rng=not args.no_load_rng)
    if note:
        print_rank_0(f"  {note}")
    print_rank_0(f"  successfully loaded {described}")
    return iteration, flops, counters
