"""One object per way of saving: what a save plans (in the training thread) and how it
writes its files (possibly in the --async-save thread) and what it adds at commit.

``save_checkpoint`` plans (``<Format>.plan``), checks room (``bytes_needed``), writes
(``write``) and commits (``commit_files``, then the manifest and rename of ``api``);
the crash points between these steps belong to ``api`` and ``faults``. The one crash
point inside a write, ``mid_shard``, arrives here as a callable."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional

from megatron.core.process_groups import ProcessGroups
from megatron.core.distributed.torch_fully_sharded_data_parallel import is_fully_sharded
from megatron.training.checkpointing import (
    fsdp_dtensor_format,
    megatron_lm,
    torch_dcp_format,
    torch_dist_format,
    torch_format,
)
from megatron.training.checkpointing.free_space import bytes_needed
from megatron.training.checkpointing.run_state import capture_rng, common_state


@dataclass
class SaveRequest:
    """What one save is asked to write; ``to_cpu`` snapshots tensors for a background write."""

    args: Any
    iteration: int
    model: List
    optimizer: Any
    scheduler: Any
    num_flops: float
    groups: ProcessGroups
    rank: int
    to_cpu: bool

    @property
    def save_optim(self) -> bool:
        return not self.args.no_save_optim

    @property
    def save_rng(self) -> bool:
        return not self.args.no_save_rng


class TorchDistSave:
    """--ckpt-format torch_dist: sharded tensors and objects written collectively by all ranks."""

    def __init__(self, items) -> None:
        self.items = items

    @classmethod
    def plan(cls, request: SaveRequest) -> "TorchDistSave":
        states, scalars = torch_dist_format.gather_optimizer_state(request.optimizer, request.save_optim)
        common = None
        if request.rank == 0:
            common = common_state(request.args, request.iteration, request.optimizer, request.scheduler,
                                  request.num_flops, request.save_optim, request.save_rng, scalars)
        rng = capture_rng() if request.save_rng else None
        return cls(torch_dist_format.build_save_items(request.model, request.groups, request.rank, states, common,
                                                      rng, to_cpu=request.to_cpu))

    def bytes_needed(self, group) -> Optional[int]:
        """Bytes all ranks' tensors take (collective over ``group``)."""
        return bytes_needed(self.items[0], group)

    def write(self, staging: str, group, rank: int, mid_shard: Callable[[], None]) -> List[str]:
        """Write this rank's part (collective); ``mid_shard`` runs after the first file is begun."""
        def before_write(count: int) -> None:
            if count == 1:
                mid_shard()

        return torch_dist_format.write(self.items, staging, group, before_write, rank)

    def commit_files(self, staging: str) -> List[str]:
        """Rank 0, after every rank wrote: the marker that makes the directory Megatron's torch_dist."""
        return [torch_dist_format.write_marker(staging)]


class UnmarkedTorchDistSave(TorchDistSave):
    """--ckpt-format fsdp_dtensor of a run without FSDP2: torch_dist's files without its
    ``metadata.json`` marker (``fsdp_dtensor_format``)."""

    def commit_files(self, staging: str) -> List[str]:
        return []


class FsdpDtensorSave:
    """--ckpt-format fsdp_dtensor (--use-megatron-fsdp): FSDP2's sharded DTensors as torch_dcp
    writes them, or the distributed optimizer's (or DDP's) state as torch_dist writes it."""

    @staticmethod
    def plan(request: SaveRequest):
        if is_fully_sharded(request.model):
            return torch_dcp_format.TorchDcpSave.plan(request)
        return UnmarkedTorchDistSave.plan(request)


class TorchSave:
    """--ckpt-format torch: one file per model-parallel rank, written by data-parallel rank 0."""

    def __init__(self, payload) -> None:
        self.payload = payload

    @classmethod
    def plan(cls, request: SaveRequest) -> "TorchSave":
        return cls(torch_format.build_payload(request.args, request.iteration, request.model, request.optimizer,
                                              request.scheduler, request.num_flops, request.save_optim,
                                              request.save_rng, request.groups))

    def bytes_needed(self, group) -> Optional[int]:
        """Not estimated for this format: no room check before writing."""
        return None

    def write(self, staging: str, group, rank: int, mid_shard: Callable[[], None]) -> List[str]:
        """Write this rank's file, if it writes one (not collective); ``mid_shard`` runs part-way."""
        return torch_format.write(self.payload, staging, mid_shard)

    def commit_files(self, staging: str) -> List[str]:
        return []


class MegatronLayoutSave:
    """--ckpt-megatron-lm-layout: model weights only, under Megatron-LM's own keys, in the
    files of either format (so writing and committing are that format's)."""

    @staticmethod
    def plan(request: SaveRequest):
        if request.args.ckpt_format == torch_dist_format.FORMAT:
            return TorchDistSave(megatron_lm.torch_dist.build_save_items(
                request.model, request.groups, request.rank, request.args, request.iteration, request.num_flops,
                to_cpu=request.to_cpu))
        return TorchSave(megatron_lm.legacy.build_payload(request.args, request.iteration, request.model,
                                                          request.num_flops, request.groups))


PLANNERS = {torch_dist_format.FORMAT: TorchDistSave, torch_format.FORMAT: TorchSave,
            torch_dcp_format.FORMAT: torch_dcp_format.TorchDcpSave, fsdp_dtensor_format.FORMAT: FsdpDtensorSave}
SAVE_FORMATS = tuple(PLANNERS)


def planner_for(ckpt_format: str, megatron_layout: bool):
    """The object whose ``plan`` builds the save of this format and layout."""
    return MegatronLayoutSave if megatron_layout else PLANNERS[ckpt_format]
