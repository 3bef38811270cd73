"""Per-tensor FP8 scaling: amax, scale, and the delayed-scaling amax history.

A tensor x is cast to FP8 as ``q = fp8(clamp(x * scale, -fp8_max, fp8_max))`` and read
back as ``q / scale``. The scale maps the tensor's absolute maximum (amax) onto the
format's largest value, backed off by 2^margin:

    scale = (fp8_max / amax) / 2^margin

kept at its previous value when amax is 0 (nothing to scale) or not finite (the previous
scale is the best guess; the NaN check reports the non-finite amax itself).

- ``tensorwise`` (current scaling): the scale comes from this tensor's own amax.
- ``delayed``: the scale comes from the amax history of earlier calls (``max`` over the
  history, or its ``most_recent`` entry), so quantizing needs no extra pass over the
  tensor before the cast. This call's amax then enters the history and the scale is
  recomputed for the next call. History row 0 collects the current call's amax; after the
  update the rows roll down by one and row 0 is cleared, so a history of length L holds
  this call and the L-1 before it when the scale is computed.

Amaxes are reduced (max) over the linear's tensor-parallel group, so every rank of the
group holds the same scaling state: the state is replicated and reshards trivially.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import replace
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from megatron.core.fp8 import recompute_replay
from megatron.core.fp8.recipe import GRAD_OUTPUT, NUM_SLOTS, Fp8Recipe
from megatron.core.fp8.weight_cache import Fp8WeightCache



def fp8_max(dtype: torch.dtype) -> float:
    """Largest finite value of an FP8 dtype (448 for e4m3fn, 57344 for e5m2)."""
    return float(torch.finfo(dtype).max)


def tensor_amax(x: torch.Tensor) -> torch.Tensor:
    """max |x| as a float32 scalar tensor (NaN if x holds a NaN; 0 for an empty x, e.g.
    an expert that received no tokens)."""
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    return x.detach().abs().amax().float()


def group_amax(x: torch.Tensor, row_group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """max |x| over the rows of each group: x [N, K], ``row_group`` [N] (group of each row,
    int64) -> [num_groups] float32; 0 for a group without rows, NaN where a row holds a NaN.
    No host synchronization (the group sizes stay on the device)."""
    row_amax = x.detach().abs().amax(dim=-1).float() if x.size(-1) else x.new_zeros(x.size(0), dtype=torch.float32)
    out = torch.zeros(num_groups, dtype=torch.float32, device=x.device)
    return out.scatter_reduce_(0, row_group, row_amax, reduce="amax", include_self=True)


@torch.no_grad()
def advance_scales(history: torch.Tensor, scale: torch.Tensor, amax: torch.Tensor, recipe: Fp8Recipe,
                   fmt_max: float) -> torch.Tensor:
    """The scales to quantize with now, for one slot of one or several scaling states,
    updating the state in place (see the module docstring for the two recipes).

    ``history`` [L, *B] (views of amax histories, newest first), ``scale`` [*B] (views of
    the stored scales) and this call's ``amax`` [*B]; returns [*B]. One FP8 linear passes
    B = () (``Fp8Scaling.scale_for``); the grouped linear of the MoE experts passes its G
    experts' states stacked (B = (G,)), so both follow exactly the same rule."""
    if recipe.recipe == "tensorwise":
        used = compute_scale(amax, fmt_max, recipe.margin, torch.ones_like(amax))
        history[0] = amax
        scale.copy_(used)
        return used
    used = scale.clone()
    history[0] = amax
    window = history.amax(dim=0) if recipe.amax_compute_algo == "max" else history[0]
    scale.copy_(compute_scale(window, fmt_max, recipe.margin, used))
    if history.size(0) > 1:
        history.copy_(torch.roll(history, 1, dims=0))
        history[0] = 0.0
    return used


def compute_scale(amax: torch.Tensor, fmt_max: float, margin: int, previous: torch.Tensor) -> torch.Tensor:
    """(fmt_max / amax) / 2^margin, or ``previous`` where amax is 0 or not finite."""
    # a true division: ``float / tensor`` would compute fmt_max * (1 / amax), one rounding more
    scale = torch.full_like(amax, fmt_max).div(amax).div(2.0 ** margin)
    scale = torch.where(amax > 0.0, scale, previous)
    return torch.where(torch.isfinite(amax), scale, previous)


def reduce_amax(amax: torch.Tensor, group) -> torch.Tensor:
    """The max of ``amax`` over ``group`` (no-op without a group of more than one rank)."""
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    return amax


def quantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x * scale saturated to the format's range and cast to ``dtype`` (an FP8 dtype).

    Saturating first matters: e4m3fn has no infinity, so an out-of-range cast gives NaN.
    """
    limit = fp8_max(dtype)
    return (x.float() * scale).clamp_(-limit, limit).to(dtype)


@functools.lru_cache(maxsize=None)
def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda and _triton_available()


def tensor_amax_fused(x: torch.Tensor) -> torch.Tensor:
    """``tensor_amax``; on CUDA one Triton pass (``cast_triton``) instead of ``abs`` writing
    a full copy that ``amax`` reads again."""
    if _use_triton(x):
        from megatron.core.fp8 import cast_triton

        return cast_triton.amax(x)
    return tensor_amax(x)


def quantize_fused(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``quantize``; on CUDA one Triton kernel (upcast, multiply, clamp, cast) for 2-D ``x``."""
    if _use_triton(x) and x.dim() == 2:
        from megatron.core.fp8 import cast_triton

        return cast_triton.cast(x, scale, dtype, transpose=False)[0]
    return quantize(x, scale, dtype)


def quantize_with_transpose(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
    """(q, q^T contiguous) of a 2-D ``x``, in one pass on CUDA: ``torch._scaled_mm`` wants
    its first operand row-major and its second column-major, so the backward GEMMs need
    the transposed FP8 copies of the input, the weight and the output gradient."""
    if _use_triton(x):
        from megatron.core.fp8 import cast_triton

        return cast_triton.cast(x, scale, dtype, transpose=True)
    q = quantize(x, scale, dtype)
    return q, q.t().contiguous()


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q / scale in float32, computed as q * (1 / scale) as the FP8 GEMM applies it."""
    return q.float() * scale.reciprocal()


class Fp8Operand(NamedTuple):
    """A tensor quantized for the FP8 GEMMs: row-major ``q``, its transposed copy ``q_t``
    (None when not asked for), the scale and its reciprocal (float32 scalars)."""

    q: torch.Tensor
    q_t: Optional[torch.Tensor]
    scale: torch.Tensor
    scale_inv: torch.Tensor


# The attribute under which a linear holds its ``Fp8Scaling`` and the buffers that are
# its saved state: checkpoint keys ``<linear>.fp8.amax_history`` and ``<linear>.fp8.scale``.
SCALING_MODULE_NAME = "fp8"
SCALING_BUFFER_NAMES = ("amax_history", "scale")
_SCALING_KEY_ENDINGS = tuple(f"{SCALING_MODULE_NAME}.{name}" for name in SCALING_BUFFER_NAMES)


def is_fp8_scaling_key(key: str) -> bool:
    """Whether a state-dict or checkpoint key names an FP8 linear's scaling state, under
    any prefix (``decoder.layers.3.mlp.linear_fc1.fp8.amax_history``, ``model.<...>.fp8.scale``).
    Checkpoint loaders use it to start such state fresh where a checkpoint lacks it."""
    return any(key == ending or key.endswith("." + ending) for ending in _SCALING_KEY_ENDINGS)


def is_amax_history_key(key: str) -> bool:
    """Whether ``key`` names an FP8 amax history (the one scaling buffer whose shape
    depends on a flag, --fp8-amax-history-len)."""
    return is_fp8_scaling_key(key) and key.endswith(SCALING_BUFFER_NAMES[0])


def resize_amax_history(history: torch.Tensor, length: int) -> torch.Tensor:
    """A saved ``amax_history`` [L, 3] as a history of ``length`` rows that keeps the most
    recent amaxes, in the layout ``Fp8Scaling.scale_for`` leaves between calls.

    Rows run newest first. Between calls a history longer than one row has its row 0
    cleared (the next call's amax goes there) and the last completed amaxes in rows 1..;
    a one-row history holds the last amax in row 0. So the completed amaxes are taken in
    order and placed from row 1 (row 0 when ``length`` is 1); a longer history is padded
    with zeros, which no ``max`` over the window picks. The result equals the history a run
    with ``length`` rows would hold after the same calls, wherever the saved one holds enough
    of them. (Under ``tensorwise`` no history is read; its row 0 is the last amax.)
    """
    if length < 1:
        raise ValueError(f"--fp8-amax-history-len must be a positive integer, got {length}")
    resized = history.new_zeros(length, history.size(1))
    completed = history[1:] if history.size(0) > 1 else history
    first = 0 if length == 1 else 1
    count = min(completed.size(0), length - first)
    resized[first:first + count] = completed[:count]
    return resized


class Fp8Scaling(torch.nn.Module):
    """The scaling state of one FP8 linear: slots input, weight, output gradient.

    Buffers (saved in checkpoints, replicated over the tensor-parallel group):
    ``amax_history`` [amax_history_len, 3] float32, ``scale`` [3] float32 (the scale the
    next call uses under ``delayed``; the last one used under ``tensorwise``).
    """

    def __init__(self, recipe: Fp8Recipe, device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.recipe = recipe
        self.register_buffer("amax_history", torch.zeros(recipe.amax_history_len, NUM_SLOTS, device=device))
        self.register_buffer("scale", torch.ones(NUM_SLOTS, device=device))
        self.weight_cache = Fp8WeightCache()
        # Set by the data-parallel wrapper when the weight is all-gathered in FP8
        # (--fp8-param-gather, ``fp8.param_gather``): the weight is then scaled by its own
        # amax (current scaling) under either recipe, and its FP8 copies come from the gather.
        self.weight_gathered_in_fp8 = False
        # Set at construction (``layer_scope``) when a tensor-parallel linear reduces its
        # amaxes over more than its tensor-parallel group (tensor x context parallel).
        self.amax_group = None

    def _apply(self, fn, recurse=True):
        # A model moved to bf16 (--bf16) keeps this state in float32: torch._scaled_mm and
        # torch._scaled_grouped_mm take float32 scales only, and a bf16 amax or scale would
        # keep 8 bits of the 24 the scaling math computes.
        super()._apply(fn, recurse)
        for name in SCALING_BUFFER_NAMES:
            buffer = getattr(self, name)
            if buffer.dtype != torch.float32:
                setattr(self, name, buffer.float())
        return self

    @torch.no_grad()
    def quantize_operand(self, x: torch.Tensor, slot: int, group=None, transpose: bool = False) -> Fp8Operand:
        """Quantize the 2-D ``x`` for slot ``slot``, updating the state.

        Under ``tensorwise`` on CUDA this is two Triton launches (amax, then the cast that
        derives the scale from it and records both in the state), plus the amax reduction
        over ``group``: a linear's forward and backward issue few enough host operations
        that the host keeps ahead of the GPU. Under ``delayed`` on CUDA one launch casts with
        the state's scale and takes the amax in the same pass; the amax is then reduced and
        moves the state on in one more launch (``cast_triton.advance_delayed``, the update
        ``advance_scales`` makes), as ``scale_for`` would have done before the cast.
        Elsewhere: ``scale_for`` and the casts.

        Under ``delayed`` a forward operand (input, weight) of a checkpointed forward notes
        its scale, and the recompute quantizes with that scale and leaves the state alone
        (``recompute_replay``)."""
        dtype = self.recipe.dtype(slot)
        replayed = self._replayed_scale(slot)
        if replayed is not None:
            return self._quantize_with(x, replayed, dtype, transpose)
        if _use_triton(x):
            from megatron.core.fp8 import cast_triton

            if self.recipe.recipe == "tensorwise":
                amax = reduce_amax(cast_triton.amax(x), group)
                return Fp8Operand(*cast_triton.cast_current_scaling(
                    x, amax, dtype, self.recipe.margin, transpose, self.amax_history[0, slot:slot + 1],
                    self.scale[slot:slot + 1]))
            q, q_t, scale, scale_inv, amax = cast_triton.cast_delayed_scaling(
                x, self.scale[slot:slot + 1], dtype, transpose)
            cast_triton.advance_delayed(self.amax_history[:, slot], self.scale[slot:slot + 1],
                                        reduce_amax(amax, group), fp8_max(dtype), self.recipe.margin,
                                        self.recipe.amax_compute_algo == "max")
            return Fp8Operand(q, q_t, scale, scale_inv)
        return self._quantize_with(x, self.scale_for(x, slot, group), dtype, transpose)

    def _replayed_scale(self, slot: int) -> Optional[torch.Tensor]:
        """Under ``delayed``, for a forward operand: the scale a recompute must use (None
        outside one); inside a first checkpointed forward, note the scale about to be used."""
        if self.recipe.recipe != "delayed" or slot == GRAD_OUTPUT:
            return None
        replay = recompute_replay.replaying_now()
        if replay is not None:
            return replay.take(self, slot)
        record = recompute_replay.recording_now()
        if record is not None:
            record.note(self, slot, self.scale[slot:slot + 1].clone())
        return None

    @staticmethod
    def _quantize_with(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, transpose: bool) -> Fp8Operand:
        """``x`` quantized with ``scale`` as it is (the cast ``delayed`` uses), no state touched."""
        if _use_triton(x):
            from megatron.core.fp8 import cast_triton

            q, q_t, used, scale_inv, _ = cast_triton.cast_delayed_scaling(x, scale.reshape(1), dtype, transpose)
            return Fp8Operand(q, q_t, used, scale_inv)
        scale = scale.reshape(())
        if transpose:
            q, q_t = quantize_with_transpose(x, scale, dtype)
        else:
            q, q_t = quantize_fused(x, scale, dtype), None
        return Fp8Operand(q, q_t, scale, scale.reciprocal())

    @torch.no_grad()
    def record_current_scale(self, amax: torch.Tensor, slot: int) -> torch.Tensor:
        """The current-scaling scale of ``amax`` (already reduced) for ``slot``, recorded in
        the state as ``tensorwise`` records it (history row 0 and ``scale``), whatever the
        recipe: the weights gathered in FP8 are scaled this way under ``delayed`` too."""
        return advance_scales(self.amax_history[:, slot], self.scale[slot], amax.to(self.scale.device),
                              replace(self.recipe, recipe="tensorwise"), fp8_max(self.recipe.dtype(slot)))

    @torch.no_grad()
    def quantize_current(self, x: torch.Tensor, slot: int, group=None) -> Fp8Operand:
        """``x`` (2-D) and its transpose quantized with the current scale of ``x`` (amax
        reduced over ``group``), recorded by ``record_current_scale``."""
        scale = self.record_current_scale(reduce_amax(tensor_amax_fused(x).to(self.scale.device), group), slot)
        q, q_t = quantize_with_transpose(x, scale, self.recipe.dtype(slot))
        return Fp8Operand(q, q_t, scale, scale.reciprocal())

    @torch.no_grad()
    def scale_for(self, x: torch.Tensor, slot: int, group=None) -> torch.Tensor:
        """The scale to quantize ``x`` with (a float32 scalar), updating the state."""
        fmt_max = fp8_max(self.recipe.dtype(slot))
        amax = reduce_amax(tensor_amax_fused(x).to(self.scale.device), group)
        return advance_scales(self.amax_history[:, slot], self.scale[slot], amax, self.recipe, fmt_max)

    def extra_repr(self) -> str:
        r = self.recipe
        return (f"format={r.fmt}, recipe={r.recipe}, margin={r.margin}, amax_history_len={r.amax_history_len}, "
                f"amax_compute_algo={r.amax_compute_algo}, wgrad={r.wgrad}")


def fp8_state_is_finite(modules) -> bool:
    """False if any FP8 scale or recorded amax under ``modules`` is NaN or Inf (a NaN/Inf
    activation or gradient reached an FP8 linear, or a scale overflowed)."""
    tensors = [t for module in modules for m in module.modules() if isinstance(m, Fp8Scaling)
               for t in (m.amax_history, m.scale)]
    if not tensors:
        return True
    return bool(torch.isfinite(torch.stack([t.float().sum() for t in tensors])).all())
