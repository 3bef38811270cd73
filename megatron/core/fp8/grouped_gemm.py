"""The FP8 grouped GEMMs of the MoE experts: one GEMM per expert over its rows, all at once.

Operands are FP8; each group (expert) g has its own dequantization factor per operand
(``a_inv`` / ``b_inv`` [G] float32, 1 / scale), because each expert's tensors are scaled by
its own state (``grouped_linear``). Rows of the 2-D operands are grouped by expert as
``GroupedRows`` says (``offsets``: int32 group ends, the layout ``torch._grouped_mm`` takes).

- ``grouped_nt(a [M, K], a_inv, b [G, N, K], b_inv, rows) -> [M, N]``: group g's rows of
  ``a`` times b[g]^T (the forward: b = W; the input gradient: b = W^T).
- ``grouped_tn(a_t [N, M], a_inv, b_t [K, M], b_inv, rows) -> [G, N, K]``: for each group,
  a_g^T b_g over its rows (the weight gradient, a = dy, b = x, both passed transposed and
  contiguous: the layout the GEMM reads).

How they run:

- ``torch._scaled_grouped_mm`` (Hopper, sizes multiples of 16, both operands e4m3: the
  only format it takes), without host synchronization. Its scales are per row of the
  first operand and per column of the second, so each group's factor is repeated over its
  rows / columns. The FP8 wgrad contracts over the rows, which it wants in groups of a
  multiple of 16: the rows come padded to 16 per group (``row_layout(padded=True)``).
- Where an operand is e5m2 (``--fp8-format hybrid`` gradients): the same GEMM through the
  bf16 ``torch._grouped_mm`` over the FP8 values (e4m3 and e5m2 values are exact in bf16,
  so the products and their fp32 sums are the FP8 GEMM's), the factors applied to its
  output. FP8 numerics at bf16 speed.
- Elsewhere (``fp8_gemm_nt_dequant`` per group, host loop): the fp32 emulation, or
  ``torch._scaled_mm`` per expert on an FP8 GPU without the grouped kernel. The loop needs
  the group sizes on the host and waits for the device once per call.
"""

from __future__ import annotations

import logging
from typing import NamedTuple, Optional

import torch

from megatron.core.fp8.gemm import EMULATION, fp8_gemm_nt_dequant

logger = logging.getLogger(__name__)

# Rows per group are padded to a multiple of this for the grouped kernels (the FP8 wgrad
# contracts over the rows; 16 FP8 bytes is the kernel's alignment).
ROW_ALIGN = 16
_E4M3 = torch.float8_e4m3fn


class GroupedRows(NamedTuple):
    """Where the N rows given (grouped by expert, ``counts`` [G] rows each) sit for the
    GEMMs. ``row_group`` [N]: the group of each given row; ``offsets`` [G] int32: group
    ends in the GEMM layout; ``slot`` [N]: each given row's row in the GEMM layout (None
    when the layout is the given rows themselves); ``rows``: rows of the GEMM layout
    (host-known: N, or when padded its upper bound N + G * (ROW_ALIGN - 1) rounded up to
    a multiple of ROW_ALIGN)."""

    row_group: torch.Tensor
    offsets: torch.Tensor
    slot: Optional[torch.Tensor]
    rows: int

    @property
    def num_groups(self) -> int:
        return self.offsets.numel()


def row_layout(counts: torch.Tensor, num_rows: int, padded: bool) -> GroupedRows:
    """The ``GroupedRows`` of ``num_rows`` rows grouped by ``counts`` [G] (int64, on the
    rows' device); with ``padded`` every group starts at a multiple of ``ROW_ALIGN``. No
    host synchronization."""
    ends = torch.cumsum(counts, dim=0)
    positions = torch.arange(num_rows, device=counts.device)
    row_group = torch.searchsorted(ends, positions, right=True)
    if not padded:
        return GroupedRows(row_group, ends.to(torch.int32), None, num_rows)
    padded_counts = (counts + ROW_ALIGN - 1) // ROW_ALIGN * ROW_ALIGN
    padded_ends = torch.cumsum(padded_counts, dim=0)
    starts = (ends - counts).index_select(0, row_group)
    slot = (padded_ends - padded_counts).index_select(0, row_group) + positions - starts
    # the layout's row count is a multiple of ROW_ALIGN too: the wgrad reads its transposed
    # copies, whose row stride is that count
    bound = num_rows + counts.numel() * (ROW_ALIGN - 1)
    return GroupedRows(row_group, padded_ends.to(torch.int32), slot, -(-bound // ROW_ALIGN) * ROW_ALIGN)


def to_layout(x: torch.Tensor, rows: GroupedRows) -> torch.Tensor:
    """The given rows [N, ...] placed in the GEMM layout [rows, ...] (zeros elsewhere)."""
    if rows.slot is None:
        return x
    out = torch.zeros((rows.rows,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    if x.dtype.itemsize == 1 and x.dtype.is_floating_point:
        # index_copy has no FP8 kernels everywhere: copy the bytes
        out.view(torch.uint8).index_copy_(0, rows.slot, x.view(torch.uint8))
    else:
        out.index_copy_(0, rows.slot, x)
    return out


def from_layout(x: torch.Tensor, rows: GroupedRows) -> torch.Tensor:
    """The given rows back out of the GEMM layout."""
    return x if rows.slot is None else x.index_select(0, rows.slot)


def _layout_groups(rows: GroupedRows) -> torch.Tensor:
    """The group of every row of the GEMM layout (padding rows after the last group count
    as the last group: they are zero)."""
    positions = torch.arange(rows.rows, device=rows.offsets.device)
    group = torch.searchsorted(rows.offsets.long(), positions, right=True)
    return group.clamp_(max=rows.num_groups - 1)


def grouped_kernel_fits(device: torch.device, *dims: int) -> bool:
    """Whether ``torch._scaled_grouped_mm`` runs here: this torch has it, a CUDA device of
    compute capability 9.0 or higher (its FP8 grouped kernel is Hopper's), and every
    non-row dimension a multiple of 16."""
    if not (hasattr(torch, "_scaled_grouped_mm") and device.type == "cuda"):
        return False
    if torch.cuda.get_device_capability(device) < (9, 0):
        return False
    return all(d % 16 == 0 for d in dims)


def _zero_empty_groups(out: torch.Tensor, rows: GroupedRows) -> torch.Tensor:
    """``out`` [G, ...] with the groups that have no rows set to zero: a contraction over
    no rows is zero, but some grouped-GEMM kernels leave such a group's output unwritten
    (seen with torch._grouped_mm on Blackwell), and an expert without tokens must get a
    zero weight gradient. On the device, without host synchronization."""
    sizes = torch.diff(rows.offsets, prepend=rows.offsets.new_zeros(1))
    return torch.where((sizes > 0).view(-1, *([1] * (out.dim() - 1))), out, 0.0)


def _group_ends(rows: GroupedRows):
    # the loop's one host synchronization
    return [0] + rows.offsets.tolist()


def _scalar(t: torch.Tensor) -> torch.Tensor:
    # its own allocation: cuBLASLt refuses a scale pointer that is not 16-byte aligned
    return t.clone()


def grouped_nt(a: torch.Tensor, a_inv: torch.Tensor, b: torch.Tensor, b_inv: torch.Tensor, rows: GroupedRows,
               out_dtype: torch.dtype, backend: str) -> torch.Tensor:
    """Group g's rows of (a * a_inv[g]) times (b[g] * b_inv[g])^T -> [M, N] in ``out_dtype``;
    rows of the layout outside every group are left undefined."""
    if backend != EMULATION and grouped_kernel_fits(a.device, a.size(1), b.size(1)):
        group = _layout_groups(rows)
        if a.dtype == _E4M3 and b.dtype == _E4M3:
            scale_b = b_inv[:, None].expand(b.size(0), b.size(1)).contiguous()
            out = torch._scaled_grouped_mm(a, b.transpose(-2, -1), a_inv.index_select(0, group), scale_b,
                                           offs=rows.offsets, out_dtype=torch.bfloat16)
            return out.to(out_dtype)
        out = torch._grouped_mm(a.to(torch.bfloat16), b.to(torch.bfloat16).transpose(-2, -1), offs=rows.offsets)
        return (out.float() * (a_inv * b_inv).index_select(0, group)[:, None]).to(out_dtype)
    ends = _group_ends(rows)
    out = torch.zeros(a.size(0), b.size(1), dtype=out_dtype, device=a.device)
    for g in range(rows.num_groups):
        out[ends[g]:ends[g + 1]] = fp8_gemm_nt_dequant(a[ends[g]:ends[g + 1]], _scalar(a_inv[g]), b[g],
                                                       _scalar(b_inv[g]), out_dtype, backend)
    return out


def grouped_tn(a_t: torch.Tensor, a_inv: torch.Tensor, b_t: torch.Tensor, b_inv: torch.Tensor, rows: GroupedRows,
               out_dtype: torch.dtype, backend: str) -> torch.Tensor:
    """For each group g, (a_g * a_inv[g])^T (b_g * b_inv[g]) over its rows, from the
    transposed operands a_t [N, M], b_t [K, M] -> [G, N, K] in ``out_dtype``."""
    num_groups, n, k = rows.num_groups, a_t.size(0), b_t.size(0)
    if backend != EMULATION and grouped_kernel_fits(a_t.device, n, k):
        if a_t.dtype == _E4M3 and b_t.dtype == _E4M3:
            scale_a = a_inv[:, None].expand(num_groups, n).reshape(-1)
            scale_b = b_inv[:, None].expand(num_groups, k).reshape(-1)
            out = torch._scaled_grouped_mm(a_t, b_t.t(), scale_a, scale_b, offs=rows.offsets,
                                           out_dtype=torch.bfloat16).float()
        else:
            out = torch._grouped_mm(a_t.to(torch.bfloat16), b_t.to(torch.bfloat16).t(), offs=rows.offsets)
            out = out.float() * (a_inv * b_inv)[:, None, None]
        return _zero_empty_groups(out, rows).to(out_dtype)
    ends = _group_ends(rows)
    out = torch.empty(num_groups, n, k, dtype=out_dtype, device=a_t.device)
    for g in range(num_groups):
        out[g] = fp8_gemm_nt_dequant(a_t[:, ends[g]:ends[g + 1]], _scalar(a_inv[g]), b_t[:, ends[g]:ends[g + 1]],
                                     _scalar(b_inv[g]), out_dtype, backend)
    return out


def grouped_tn_high_precision(a: torch.Tensor, b: torch.Tensor, rows: GroupedRows, out_dtype: torch.dtype,
                              backend: str) -> torch.Tensor:
    """For each group g, a_g^T b_g over its rows of a [M, N], b [M, K] (GEMM layout), in
    the operands' precision (--no-fp8-wgrad) -> [G, N, K]: the bf16 grouped GEMM where the
    grouped kernels run, else a loop (the emulation's: the dense linear's product per expert)."""
    if backend != EMULATION and a.dtype == b.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm") \
            and grouped_kernel_fits(a.device, a.size(1), b.size(1)):
        return _zero_empty_groups(torch._grouped_mm(a.t(), b, offs=rows.offsets), rows).to(out_dtype)
    ends = _group_ends(rows)
    out = torch.empty(rows.num_groups, a.size(1), b.size(1), dtype=out_dtype, device=a.device)
    for g in range(rows.num_groups):
        out[g] = a[ends[g]:ends[g + 1]].t().matmul(b[ends[g]:ends[g + 1]]).to(out_dtype)
    return out
