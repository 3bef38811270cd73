"""``--fake-process-group``: one process plays one rank of a large job, on one GPU.

``WORLD_SIZE`` and ``RANK`` say which rank of which job (``distributed_env``); the process
joins torch's fake process-group backend instead of a real one (``megatron.core.fake_backend``),
so every collective returns at once and nothing waits for the ranks that do not exist. The
process builds, trains and measures what that rank would: its parameters, its memory peak
(the memory line after the first iteration, on CUDA) and its step time without the time spent
communicating. The values it computes are meaningless: no gradient is reduced, no activation
arrives from another stage. What the run does about that, each on purpose:

- the process speaks for the whole job: what rank 0 or the last rank prints (the start-up
  summary, the iteration line, the memory line) is printed here, whatever ``RANK`` is;
- every tensor-parallel rank reads its data itself (a broadcast delivers nothing), buffers
  that only a receive would fill start at zero and collective outputs hold this rank's own
  blocks (``megatron.core.fake_backend``), so that losses and gradients stay finite: the NaN
  check and the other result checks run as in the real job, and do the same work;
- the collectives by which ranks agree (exit conditions, which splits have data, the NaN
  check) agree with this rank alone; barriers return at once; the hang watchdog sees phases
  entered as usual;
- checkpoints are refused (``check_fake_process_group``): a saved one would hold one rank's
  shards of meaningless weights, and loading needs the other ranks' agreement.
"""

from __future__ import annotations

import argparse

import torch.distributed as dist

from megatron.core.process_groups import ProcessGroups


def init_fake_process_group(world_size: int, rank: int) -> None:
    """Join torch's fake backend as ``rank`` of ``world_size`` ranks (no other process)."""
    try:
        from torch.testing._internal.distributed.fake_pg import FakeStore
    except ImportError as error:
        raise RuntimeError("--fake-process-group needs torch's fake process-group backend "
                           "(torch.testing._internal.distributed.fake_pg), which this torch build lacks; "
                           "install a torch release that has it, or drop the flag") from error
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)


_FRESH_WEIGHTS = "the rehearsal starts from freshly initialized weights, which take the memory loaded ones would"
# dest: (flag, why a rehearsal of one rank cannot honour it, what to do)
_REFUSED_WITH_FAKE = {
    "save": ("--save", "a checkpoint of a rehearsal would hold one rank's shards of meaningless weights",
             "drop --save and --save-interval from the rehearsal"),
    "load": ("--load", "loading a checkpoint needs the other ranks to agree on it, and they do not exist",
             f"drop --load: {_FRESH_WEIGHTS}"),
    "pretrained_checkpoint": ("--pretrained-checkpoint", "loading a checkpoint needs the other ranks to agree on "
                              "it, and they do not exist", f"drop --pretrained-checkpoint: {_FRESH_WEIGHTS}"),
}


def check_fake_process_group(args: argparse.Namespace, world_size: int) -> None:
    """With --fake-process-group: RANK within WORLD_SIZE and no checkpoint to save or load."""
    from megatron.training.argument_checks import invalid  # the house error format

    if not args.fake_process_group:
        return
    if not 0 <= args.rank < world_size:
        raise invalid("--fake-process-group", True, f"RANK={args.rank} is not a rank of WORLD_SIZE={world_size}",
                      "set RANK to the rank to rehearse, from 0 to WORLD_SIZE - 1")
    for dest, (flag, why, fix) in _REFUSED_WITH_FAKE.items():
        value = getattr(args, dest, None)
        if value:
            raise invalid(flag, value, f"cannot be combined with --fake-process-group: {why}", fix)


def rehearsal_notice(pg: ProcessGroups) -> str:
    """The start-up line that says this run is a rehearsal and what its numbers mean."""
    where = ", ".join(f"{name} {pg.rank(name)}" for name in ("tp", "cp", "ep", "dp", "pp"))
    return (f"--fake-process-group: this process plays rank {dist.get_rank()} of {dist.get_world_size()} "
            f"({where}) and no collective communicates: losses, gradient norms and every value that needs "
            "another rank are meaningless; parameters, memory and step time (without communication) are "
            "this rank's")
