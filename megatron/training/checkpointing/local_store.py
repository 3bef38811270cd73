"""Node-local non-persistent checkpoints (--non-persistent-ckpt-type local): every rank
writes its own state (``local_state``) into --non-persistent-local-ckpt-dir, which is
meant to be storage on the rank's own node, and with --replication also keeps copies of
its replication partners' states, so that a node that is lost (and its files with it)
can be restored from a peer.

Layout under DIR (one directory per rank: node-local disks and one shared test disk alike)::

    DIR/rank_00003/iter_0000200/rank_00003.pt     rank 3's own state
    DIR/rank_00003/iter_0000200/rank_00001.pt     rank 1's state, replicated to rank 3
    DIR/rank_00003/iter_0000200/local_meta.json   iteration, parallel layout, ranks held

Each rank publishes its directory the way persistent checkpoints are published
(``directory``): files written into ``iter_0000200.partial``, each made durable, then one
atomic rename. Only after every rank has committed does each delete its other iterations,
so one save stays per rank (two while the next is written) and a crash never leaves a
rank without a complete one.

Replication groups (nvidia-resiliency-ext's ``CliqueReplicationStrategy``, as Megatron
uses it): with jump J and factor F, the world of W ranks (W a multiple of J*F) splits into
W/F groups of F ranks ``n, n+J, ..., n+(F-1)J`` with ``n = a*J*F + b`` (``0 <= b < J``);
every member of a group holds every member's state. J is usually the number of ranks per
node, so that the copies live on F different nodes.

Loading is collective: the ranks gather what each holds, and the newest iteration that is
complete (every rank's state held by someone, saved with this run's parallel layout and
world size) is the candidate; a rank whose own file is missing receives it from a holder.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
from typing import Dict, List, Optional, Tuple

import torch

from megatron.core.durable_files import atomic_write
from megatron.core.safe_unpickle import load_weights_only
from megatron.training.checkpointing import directory as layout
from megatron.training.checkpointing.collectives import CheckpointComm, all_gather_objects, exchange_bytes
from megatron.training.checkpointing.directory import CheckpointError
from megatron.training.checkpointing.faults import FaultHook
from megatron.training.checkpointing.local_state import LOCAL_STATE_VERSION
from megatron.training.checkpointing.run_state import describe_layout, parallel_layout
from megatron.training.rank_print import print_rank_0

META_FILENAME = "local_meta.json"
_STATE_FILE = re.compile(r"^rank_(\d{5,})\.pt$")


def replication_group(rank: int, world: int, jump: int, factor: int) -> List[int]:
    """The ranks that hold copies of each other's state, ``rank`` among them (see the
    module docstring); ``world`` must be a multiple of ``jump * factor``."""
    block = jump * factor
    if world % block:
        raise ValueError(f"--replication-jump {jump} x --replication-factor {factor} = {block} does not divide "
                         f"the world size {world}")
    base = (rank // block) * block + rank % jump
    return [base + k * jump for k in range(factor)]


def rank_root(base: str, rank: int) -> str:
    """Where ``rank`` keeps its local checkpoints (and its replicas of others')."""
    return os.path.join(base, f"rank_{rank:05d}")


def state_filename(owner: int) -> str:
    return f"rank_{owner:05d}.pt"


def _peers(args, rank: int, world: int) -> List[int]:
    if not args.replication:
        return []
    group = replication_group(rank, world, args.replication_jump, args.replication_factor)
    return [peer for peer in group if peer != rank]


def _serialize(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _write_file(path: str, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))


def save(state: dict, iteration: int, args, comm: CheckpointComm, hook: FaultHook) -> None:
    """Write this rank's ``state`` (and, with --replication, its partners' states, received
    from them) as the local checkpoint of ``iteration``; collective over ``comm``. A
    failure on any rank raises ``CheckpointError`` on every rank and deletes nothing."""
    rank, world, group = comm.rank, comm.world, comm.group
    root = rank_root(args.non_persistent_local_ckpt_dir, rank)
    data = _serialize(state)
    sizes = all_gather_objects(len(data), group)
    peers = _peers(args, rank, world)
    received = exchange_bytes({p: data for p in peers}, {p: sizes[p] for p in peers}, group)
    error = None
    try:
        staging = layout.prepare_staging(root, iteration)
        hook("before_shards", rank, iteration)
        held = {rank: data, **received}
        for owner, blob in sorted(held.items()):
            _write_file(os.path.join(staging, state_filename(owner)), blob)
        meta = {"iteration": iteration, "layout": parallel_layout(args), "holder": rank, "owners": sorted(held),
                "local_state_version": LOCAL_STATE_VERSION}
        _write_file(os.path.join(staging, META_FILENAME), json.dumps(meta, indent=1).encode())
        hook("after_shards", rank, iteration)
        layout.commit(root, iteration)
    except OSError as caught:
        error = f"rank {rank}: {type(caught).__name__}: {caught}"
    errors = [e for e in all_gather_objects(error, group) if e]
    if errors:
        raise CheckpointError(f"saving the local non-persistent checkpoint of iteration {iteration} under "
                              f"--non-persistent-local-ckpt-dir {args.non_persistent_local_ckpt_dir} failed "
                              f"({'; '.join(errors[:4])}); the previous one is kept. Free space on the node-local "
                              "disk or choose another --non-persistent-local-ckpt-dir")
    hook("after_commit", rank, iteration)
    layout.remove_all_but(root, iteration)


def _inventory(base: str, rank: int) -> Dict[int, dict]:
    """{iteration: its local_meta.json, with the ranks whose files are really there} of
    this rank's committed local checkpoints."""
    root = rank_root(base, rank)
    found = {}
    for iteration in layout.committed_iterations(root):
        directory = layout.iteration_dir(root, iteration)
        try:
            with open(os.path.join(directory, META_FILENAME), "rb") as handle:
                meta = json.loads(handle.read())
        except (OSError, ValueError):
            continue
        present = {int(m.group(1)) for m in map(_STATE_FILE.match, os.listdir(directory)) if m}
        meta["owners"] = sorted(present.intersection(meta.get("owners", [])))
        found[iteration] = meta
    return found


def _choose(inventories: List[Dict[int, dict]], world: int, mine: dict) -> Tuple[Optional[int], List[str]]:
    """(newest complete iteration or None, why each newer one was passed over): the same
    answer on every rank, as every rank reads the same gathered inventories."""
    iterations = sorted({it for inventory in inventories for it in inventory}, reverse=True)
    notes = []
    for iteration in iterations:
        entries = [inventory[iteration] for inventory in inventories if iteration in inventory]
        other = next((e["layout"] for e in entries if e.get("layout") != mine), None)
        if other is not None or any(e.get("local_state_version") != LOCAL_STATE_VERSION for e in entries):
            saved = describe_layout(other) if other is not None else "another version of this layout"
            notes.append(f"WARNING: the local non-persistent checkpoint of iteration {iteration} was saved with "
                         f"{saved}; this run has {describe_layout(mine)}: a local checkpoint only loads into the "
                         "same parallel layout and world size, so it is ignored")
            continue
        held = {owner for e in entries for owner in e["owners"]}
        missing = [r for r in range(world) if r not in held]
        if missing:
            notes.append(f"the local non-persistent checkpoint of iteration {iteration} lacks the state of "
                         f"rank(s) {missing[:8]} (no rank holds it, not even as a replica): it cannot be used")
            continue
        return iteration, notes
    return None, notes


def find(args, comm: CheckpointComm) -> Tuple[Optional[int], List[Dict[int, dict]]]:
    """(the newest complete local iteration or None, every rank's inventory); collective.
    Prints (rank 0) why newer local checkpoints were passed over."""
    inventories = all_gather_objects(_inventory(args.non_persistent_local_ckpt_dir, comm.rank), comm.group)
    iteration, notes = _choose(inventories, comm.world, parallel_layout(args))
    for note in notes:
        print_rank_0(f"  {note}")
    return iteration, inventories


def read(args, iteration: int, inventories: List[Dict[int, dict]], comm: CheckpointComm) -> Optional[dict]:
    """This rank's state of ``iteration`` (chosen by ``find``): from its own file, or, when
    that is missing, sent by the lowest rank that holds a replica. Collective; None on
    every rank when any rank could not read or unpickle its state (it is printed)."""
    rank, world, group = comm.rank, comm.world, comm.group
    base = args.non_persistent_local_ckpt_dir
    sources = {}
    for owner in range(world):
        holders = [h for h in range(world) if owner in inventories[h].get(iteration, {}).get("owners", [])]
        sources[owner] = owner if owner in holders else holders[0]
    transfers = [(sources[o], o) for o in range(world) if sources[o] != o]
    for sender, owner in transfers:
        print_rank_0(f"  rank {owner} has no local checkpoint file of iteration {iteration}: restoring it from "
                     f"the replica on rank {sender}")

    def path(owner: int) -> str:
        return os.path.join(layout.iteration_dir(rank_root(base, rank), iteration), state_filename(owner))

    sends, error = {}, None
    try:
        sends = {owner: _read_bytes(path(owner)) for sender, owner in transfers if sender == rank}
    except OSError as caught:
        sends, error = {}, f"rank {rank}: {caught}"
    gathered = all_gather_objects(({owner: len(data) for owner, data in sends.items()}, error), group)
    if _report([e for _, e in gathered], iteration):
        return None
    want = {sources[rank]: gathered[sources[rank]][0][rank]} if sources[rank] != rank else {}
    received = exchange_bytes(sends, want, group)
    state = None
    try:
        state = load_weights_only(io.BytesIO(received[sources[rank]] if want else _read_bytes(path(rank))))
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError) as caught:
        error = f"rank {rank}: {type(caught).__name__}: {caught}"
    if _report(all_gather_objects(error, group), iteration):
        return None
    return state


def _report(errors: List[Optional[str]], iteration: int) -> bool:
    """Print the ranks' read errors (rank 0); True when there is any."""
    errors = [e for e in errors if e]
    if errors:
        print_rank_0(f"  WARNING: the local non-persistent checkpoint of iteration {iteration} could not be read "
                     f"({'; '.join(errors[:4])}): it is not used")
    return bool(errors)


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()
