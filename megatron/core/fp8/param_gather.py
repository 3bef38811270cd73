"""FP8 parameter all-gather (--fp8-param-gather): the distributed optimizer gathers the
weights of the FP8 linears as FP8 bytes, and the linears compute with the gathered bytes.

Without it, each rank copies its updated fp32 master shard into the bf16 param buffer,
the buffer is all-gathered in bf16 and every FP8 linear quantizes its gathered bf16 weight
again. With it, the FP8 linears' weights sit in buffers of their own
(``DistributedDataParallel`` groups them apart), each with a uint8 twin of the param
buffer (``Fp8ParamBuffer.data``, one byte per element), and after each optimizer step:

1. each rank takes the amax of its master shard of every FP8 weight of the buffer; one
   all-reduce (MAX) over the buffer's data-parallel group for all of them at once, then one
   over each tensor-parallel group the linears reduce their amaxes over, so every rank that
   holds a piece of a weight uses the same scale, ``(448 / amax) / 2^margin`` (current
   scaling, under both recipes; ``Fp8Scaling.record_current_scale`` records it in the
   weight slot of the linear's state);
2. each rank quantizes its master shard (fp32, not a bf16 rounding of it) straight into
   its block of the uint8 buffer;
3. the bucket all-gathers the uint8 buffer (half the bytes of bf16; asynchronously with
   --overlap-param-gather, waited for by the forward pre-hooks as before);
4. once gathered (``install``), every weight's FP8 bytes, viewed as e4m3, are the ``q`` of
   its ``Fp8Operand``; the transposed copy the backward GEMM reads is built locally, and
   the operand goes into the linear's weight cache, where the forward finds it. The bf16
   param is overwritten with the dequantized FP8 weight (``q / scale``), the value the
   linears compute with, for everything that still reads the high-precision weight (the
   model checkpoint, the params norm, export), as Megatron's FP8 params do.

The fp32 master weights stay the truth: checkpoints hold them as before, and every load
into the distributed optimizer regathers the FP8 weights from them
(``DistributedOptimizer.main_params_changed``).
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from megatron.core.fp8.recipe import WEIGHT
from megatron.core.fp8.scaling import (
    SCALING_MODULE_NAME,
    Fp8Operand,
    Fp8Scaling,
    dequantize,
    quantize,
    reduce_amax,
    tensor_amax,
)

FP8_WEIGHT_DTYPE = torch.float8_e4m3fn


class Fp8Weight(NamedTuple):
    """An FP8 linear's weight: its scaling state and the group its amaxes are reduced over."""

    scaling: Fp8Scaling
    amax_group: object


def fp8_weights(module: torch.nn.Module) -> Dict[torch.nn.Parameter, Fp8Weight]:
    """The trainable weights of the FP8 linears under ``module`` (those holding an ``fp8``
    scaling state), each with its state and tensor-parallel group."""
    out: Dict[torch.nn.Parameter, Fp8Weight] = {}
    for sub in module.modules():
        scaling = getattr(sub, SCALING_MODULE_NAME, None)
        weight = getattr(sub, "weight", None)
        if isinstance(scaling, Fp8Scaling) and isinstance(weight, torch.nn.Parameter) and weight.requires_grad:
            out[weight] = Fp8Weight(scaling, getattr(sub, "tp_group", None))
    return out


class _Entry(NamedTuple):
    param: torch.nn.Parameter
    start: int
    end: int
    weight: Fp8Weight


class Fp8ParamBuffer:
    """The uint8 gather buffer of one param buffer whose params are all FP8 weights.

    ``entries``: (param, (start, end) in the buffer, its ``Fp8Weight``), in buffer order;
    ``data`` [numel] uint8 is laid out as the param buffer (padding stays 0);
    ``data_parallel_group`` is the buffer's sharding group.
    """

    def __init__(self, entries: Sequence[Tuple[torch.nn.Parameter, Tuple[int, int], Fp8Weight]], numel: int,
                 device: torch.device, data_parallel_group) -> None:
        self.entries: List[_Entry] = [_Entry(p, start, end, w) for p, (start, end), w in entries]
        self.data = torch.zeros(numel, dtype=torch.uint8, device=device)
        self.data_parallel_group = data_parallel_group
        self._scales: Optional[torch.Tensor] = None
        for entry in self.entries:
            entry.weight.scaling.weight_gathered_in_fp8 = True
            entry.weight.scaling.weight_cache.clear()
        # (group, the indices of the entries whose linears reduce over it), built once: the
        # step's amax reduction then moves no index list to the device.
        groups: List[object] = []
        for entry in self.entries:
            if not any(entry.weight.amax_group is g for g in groups):
                groups.append(entry.weight.amax_group)
        self._tp_groups = [(group, torch.tensor([i for i, e in enumerate(self.entries) if e.weight.amax_group is group],
                                                device=device)) for group in groups]

    def _reduce_over_tensor_parallel(self, amax: torch.Tensor) -> torch.Tensor:
        """MAX of each entry's amax over its linear's group: one all-reduce per distinct
        group, in the order the groups first appear (the same on every rank)."""
        for group, index in self._tp_groups:
            amax[index] = reduce_amax(amax[index].contiguous(), group)
        return amax

    @torch.no_grad()
    def quantize_shards(self, pieces: Dict[torch.nn.Parameter, Tuple[torch.Tensor, Tuple[int, int]]]) -> None:
        """Quantize this rank's master pieces into ``data``. ``pieces[param]``: (the fp32
        master values of the owned piece, flat; its (lo, hi) in buffer coordinates); a
        param this rank owns no piece of is absent. Collective over the data-parallel group
        and the linears' tensor-parallel groups (see the module docstring)."""
        if not self.entries:
            return
        device = self.data.device
        local = [tensor_amax(pieces[e.param][0]) if e.param in pieces else torch.zeros((), device=device)
                 for e in self.entries]
        amax = reduce_amax(torch.stack([a.to(device) for a in local]), self.data_parallel_group)
        amax = self._reduce_over_tensor_parallel(amax)
        scales = torch.stack([e.weight.scaling.record_current_scale(a, WEIGHT).to(device)
                              for e, a in zip(self.entries, amax)])
        for index, entry in enumerate(self.entries):
            if entry.param in pieces:
                master, (lo, hi) = pieces[entry.param]
                self.data[lo:hi].copy_(quantize(master, scales[index], FP8_WEIGHT_DTYPE).view(torch.uint8))
        self._scales = scales

    @torch.no_grad()
    def install(self, start: int, end: int) -> None:
        """After the gather of buffer range [start, end): each FP8 weight inside becomes
        its linear's cached ``Fp8Operand`` and its param the dequantized value."""
        if self._scales is None:
            return
        for index, entry in enumerate(self.entries):
            if entry.start < start or entry.end > end:
                continue
            param = entry.param
            q = self.data[entry.start:entry.end].view(FP8_WEIGHT_DTYPE).view(param.shape)
            scale = self._scales[index].to(entry.weight.scaling.scale.device)
            param.detach().copy_(dequantize(q, scale).to(param.dtype))
            operand = Fp8Operand(q, q.t().contiguous(), scale, scale.reciprocal())
            entry.weight.scaling.weight_cache.put(param, operand)
