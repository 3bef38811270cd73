"""FP8 scaling state on load, the same in every checkpoint format.

Two differences between a checkpoint and an FP8 model are not errors:

- the checkpoint lacks an FP8 linear's scaling state (``<linear>.fp8.amax_history`` and
  ``.fp8.scale``, ``megatron.core.fp8.scaling.is_fp8_scaling_key``): it was saved without
  FP8, or with other layers in FP8 (another --first-last-layers-bf16 split). That linear
  keeps the state it was built with (amax history 0, scale 1), as at the start of an FP8
  run; every other key loads as usual, and any other missing key is still refused;
- the saved amax history has another length (--fp8-amax-history-len changed): it is read
  at its saved shape and resized (``resize_amax_history``: the most recent amaxes kept,
  zeros where the new history is longer); the scale loads as saved.

The MoE experts' state (``...experts.local_experts.<global expert>.linear_fc1.fp8.*``, one
per expert and linear, whichever of --moe-grouped-gemm or the loop runs them) follows the
same rules by the same key test. Its keys carry the global expert number, like the expert
weights', so in torch_dist it loads into any expert-parallel layout.

Each format decides per key with ``fresh_or_resized``, records what it did in an
``Fp8LoadReport`` and calls ``log_report`` (a collective over the load's group), which
logs one line per kind of change on rank 0, counted over all ranks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.distributed as dist

from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.fp8.scaling import is_amax_history_key, is_fp8_scaling_key, resize_amax_history

logger = logging.getLogger(__name__)

FRESH, RESIZE = "fresh", "resize"


def fresh_or_resized(key: str, saved_shape: Optional[Sequence[int]], model_shape: Sequence[int]) -> Optional[str]:
    """How a model tensor that does not match the checkpoint is loaded: ``FRESH`` for FP8
    scaling state the checkpoint lacks (``saved_shape`` None), ``RESIZE`` for an amax
    history saved with another length (same slot count), None when it is a real mismatch
    (or no mismatch at all)."""
    if not is_fp8_scaling_key(key):
        return None
    if saved_shape is None:
        return FRESH
    saved, mine = tuple(saved_shape), tuple(model_shape)
    if saved != mine and is_amax_history_key(key) and len(saved) == 2 and saved[1:] == mine[1:]:
        return RESIZE
    return None


@dataclass
class Fp8LoadReport:
    """What one rank's load did to FP8 scaling state. ``fresh``: amax-history keys (one per
    FP8 linear, named so that replicas on several ranks count once) that start fresh;
    ``resized``: (saved length, new length) pairs; ``checkpoint_has_fp8``: whether the
    checkpoint holds any FP8 scaling state; ``unused``: saved histories of linears that do
    not run in FP8 here."""

    fresh: Set[str] = field(default_factory=set)
    resized: Set[Tuple[int, int]] = field(default_factory=set)
    checkpoint_has_fp8: bool = False
    unused: Set[str] = field(default_factory=set)

    def note_fresh(self, key: str) -> None:
        if is_amax_history_key(key):
            self.fresh.add(key)

    def note_unused(self, key: str) -> None:
        if is_amax_history_key(key):
            self.unused.add(key)

    def note_resized(self, saved_length: int, length: int) -> None:
        self.resized.add((int(saved_length), int(length)))


def fit_state_dict(saved: dict, mine: dict, report: Fp8LoadReport, name_prefix: str = "") -> None:
    """Make a saved state dict fit ``mine`` (a model's state dict) in FP8 scaling state, in
    place: a key it lacks takes the model's own (fresh) tensor, a history of another length
    is resized, the state of a linear that does not run in FP8 here is dropped.
    ``name_prefix`` makes the recorded names unique over ranks."""
    report.checkpoint_has_fp8 = report.checkpoint_has_fp8 or any(is_fp8_scaling_key(k) for k in saved)
    for key in [k for k in saved if is_fp8_scaling_key(k) and k not in mine]:
        del saved[key]
        report.note_unused(name_prefix + key)
    for key, tensor in mine.items():
        value = saved.get(key)
        how = fresh_or_resized(key, None if value is None else tuple(value.shape), tuple(tensor.shape))
        if how == FRESH:
            saved[key] = tensor.detach().clone()
            report.note_fresh(name_prefix + key)
        elif how == RESIZE:
            saved[key] = resize_amax_history(value, tensor.size(0)).to(tensor.dtype)
            report.note_resized(value.size(0), tensor.size(0))


Resizes = List[Tuple[torch.Tensor, torch.Tensor]]  # (model tensor, the saved history read for it)


def fit_sharded_requests(tensors: List[ShardedTensor], saved_shapes: Dict[str, Tuple[int, ...]],
                         report: Fp8LoadReport) -> Tuple[List[ShardedTensor], Resizes]:
    """The chunks to read from a sharded checkpoint whose tensors have ``saved_shapes``:
    FP8 scaling state it lacks is not requested (the model keeps its fresh state), a
    history of another length is requested at its saved shape into a new buffer. Returns
    (requests, [(model tensor, buffer read for it)]); after the read, ``finish_resizes``
    copies each resized buffer into its model tensor. The FP8 buffers are replicated, so
    each is one whole chunk."""
    report.checkpoint_has_fp8 = report.checkpoint_has_fp8 or any(is_fp8_scaling_key(k) for k in saved_shapes)
    requests, resizes = [], []
    for chunk in tensors:
        how = fresh_or_resized(chunk.key, saved_shapes.get(chunk.key), chunk.global_shape)
        if how == FRESH:
            report.note_fresh(chunk.key)
        elif how == RESIZE and chunk.local_shape == chunk.global_shape:
            saved = saved_shapes[chunk.key]
            buffer = torch.zeros(saved, dtype=chunk.data.dtype, device=chunk.data.device)
            requests.append(ShardedTensor.whole(chunk.key, buffer))
            resizes.append((chunk.data, buffer))
            report.note_resized(saved[0], chunk.global_shape[0])
        else:
            requests.append(chunk)
    return requests, resizes


def fit_flat_state(model_state: Dict[str, torch.Tensor], prefix: str, saved_shapes: Dict[str, Tuple[int, ...]],
                   report: Fp8LoadReport, name_prefix: str = "") -> Tuple[dict, Resizes]:
    """``fit_sharded_requests`` for a flat state dict read whole by key (torch_dcp): the
    checkpoint key of ``model_state[k]`` is ``prefix + k``. Returns (the state to read: FP8
    state the checkpoint lacks left out, resized histories as buffers of the saved shape;
    [(model tensor, buffer)]); ``model_state`` keeps every key for a strict load."""
    report.checkpoint_has_fp8 = report.checkpoint_has_fp8 or any(is_fp8_scaling_key(k) for k in saved_shapes)
    to_read, resizes = {}, []
    for key, tensor in model_state.items():
        saved = saved_shapes.get(prefix + key)
        how = fresh_or_resized(key, saved, tuple(tensor.shape))
        if how == FRESH:
            report.note_fresh(name_prefix + key)
        elif how == RESIZE:
            buffer = torch.zeros(saved, dtype=tensor.dtype, device=tensor.device)
            to_read[key] = buffer
            resizes.append((tensor, buffer))
            report.note_resized(saved[0], tensor.size(0))
        else:
            to_read[key] = tensor
    for key in saved_shapes:
        if key.startswith(prefix) and is_fp8_scaling_key(key) and key[len(prefix):] not in model_state:
            report.note_unused(name_prefix + key[len(prefix):])
    return to_read, resizes


def drop_unused(unexpected: List[str], report: Fp8LoadReport) -> List[str]:
    """``unexpected`` (``"<key> <shape>"`` lines of saved tensors no rank asked for) less
    the FP8 scaling state of linears that do not run in FP8 here, which is not an error."""
    kept = []
    for line in unexpected:
        key = line.split(" ", 1)[0]
        if is_fp8_scaling_key(key):
            report.note_unused(key)
        else:
            kept.append(line)
    return kept


def finish_resizes(resizes: Resizes) -> None:
    """Copy each amax history read at its saved length into the model's, resized."""
    with torch.no_grad():
        for target, saved in resizes:
            target.copy_(resize_amax_history(saved, target.size(0)))


def combine(reports: List[Fp8LoadReport]) -> Fp8LoadReport:
    total = Fp8LoadReport()
    for report in reports:
        total.fresh |= report.fresh
        total.resized |= report.resized
        total.checkpoint_has_fp8 = total.checkpoint_has_fp8 or report.checkpoint_has_fp8
        total.unused |= report.unused
    return total


def describe(report: Fp8LoadReport) -> List[str]:
    """The log lines for a combined report (none when the FP8 state loaded as saved)."""
    lines = []
    count = len(report.fresh)
    if count:
        start = (f"{count} FP8 linear(s) start with fresh scaling state (amax history 0, scale 1), as at the "
                 "start of an FP8 run: ")
        if report.checkpoint_has_fp8:
            lines.append(start + "the checkpoint holds FP8 scaling state for other layers only (saved with other "
                         "layers in FP8, e.g. another --first-last-layers-bf16 split); the others load theirs")
        else:
            lines.append(start + "the checkpoint was saved without FP8")
    if report.unused:
        lines.append(f"the checkpoint's FP8 scaling state of {len(report.unused)} linear(s) is not used: they do "
                     "not run in FP8 in this run")
    for saved, length in sorted(report.resized):
        lines.append(f"FP8 amax histories saved with {saved} rows load into --fp8-amax-history-len {length}: "
                     "the most recent amaxes are kept" + (", the rest is zeros" if length > saved else "")
                     + "; the scales load as saved")
    return lines


def log_report(report: Fp8LoadReport, gather: Callable[[object], List[object]]) -> None:
    """Combine every rank's report (a collective: all ranks call it) and log it on rank 0."""
    total = combine(gather(report))
    if not dist.is_initialized() or dist.get_rank() == 0:
        for line in describe(total):
            logger.info(line)
