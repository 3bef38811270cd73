"""The experts' grouped linear with their weight gradients accumulated inside the GEMM.

With ``--moe-grouped-gemm`` the experts' weight gradients come from one grouped GEMM
(``torch._grouped_mm``), which can only write a new half-precision tensor; the DDP hook
then adds each expert's gradient into its fp32 ``main_grad``. In the 8-expert benchmark
that add was the largest kernel of the step (it reads and writes every expert's fp32
``main_grad`` and reads the bf16 gradient, each micro-batch). Under
``gradient_accumulation_fusion`` (Megatron's default), as the dense linears do with
``addmm(out_dtype=fp32)``, the weight-gradient GEMM here adds its fp32 result straight into
``main_grad`` (``grouped_wgrad_triton``) and marks the weights ``grad_added_to_main_grad``.
The sum is the dense linears' one: each micro-batch's fp32 product added in fp32, without
the rounding to bf16 in between.

It applies where the grouped GEMM runs on the groups as they are (Hopper, bf16), Triton is
installed, and every expert's ``main_grad`` is an fp32 slice of one buffer (DDP's); the
forward and the input gradient are ``torch._grouped_mm`` as before.
"""

from __future__ import annotations

import importlib.util
from typing import Dict, Sequence, Tuple

import torch

from megatron.core.transformer.moe import expert_weights

_TRITON = importlib.util.find_spec("triton") is not None

# (device, each main_grad's element offset in its buffer) -> those offsets on the device; made
# once per buffer layout, before any CUDA graph capture (a host list copied to the device
# inside a capture would be read again at every replay). Holds no buffer alive.
_OFFSETS: Dict[Tuple[torch.device, Tuple[int, ...]], torch.Tensor] = {}


def accumulates_in_gemm(weights: Sequence[torch.Tensor]) -> bool:
    """Whether the weight gradients of ``weights`` (the local experts' weights of one
    linear) can be added into their ``main_grad`` by the grouped kernel."""
    if not _TRITON or not weights:
        return False
    grads = [getattr(w, "main_grad", None) for w in weights]
    if any(g is None for g in grads):
        return False
    storage = grads[0].untyped_storage().data_ptr()
    return all(
        w.dtype in (torch.bfloat16, torch.float16) and g.dtype == torch.float32 and g.is_contiguous()
        and g.shape == w.shape and g.device == w.device and g.untyped_storage().data_ptr() == storage
        for w, g in zip(weights, grads)
    )


def _buffer_and_offsets(main_grads: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(the buffer holding ``main_grads`` as one flat tensor, each one's offset in it)."""
    first = main_grads[0]
    flat = first.as_strided((first.untyped_storage().nbytes() // first.element_size(),), (1,), 0)
    key = (first.device, tuple(g.storage_offset() for g in main_grads))
    if key not in _OFFSETS:
        _OFFSETS[key] = torch.tensor(key[1], dtype=torch.int64, device=first.device)
    return flat, _OFFSETS[key]


def add_weight_grads(weights: Sequence[torch.Tensor], dy: torch.Tensor, x: torch.Tensor, ends: torch.Tensor) -> None:
    """weights[g].main_grad += dy[rows of g]^T @ x[rows of g] (rows ``ends[g-1]:ends[g]``),
    in fp32, and mark the weights as done for the DDP hook."""
    from megatron.core.transformer.moe.grouped_wgrad_triton import grouped_wgrad_accumulate

    flat, offsets = _buffer_and_offsets([w.main_grad for w in weights])
    grouped_wgrad_accumulate(flat, offsets, dy, x, ends)
    for w in weights:
        w.grad_added_to_main_grad = True


class _GroupedLinear(torch.autograd.Function):
    """x [T, k] grouped by ``ends`` times weights[g]^T ([n, k] each) -> [T, n]; backward:
    the input gradient by grouped GEMM, the weights' gradients into ``main_grad``."""

    @staticmethod
    def forward(ctx, x, ends, *weights):
        ctx.save_for_backward(x, ends, *weights)
        return torch._grouped_mm(x, expert_weights.stacked(weights).transpose(-2, -1), offs=ends)

    @staticmethod
    def backward(ctx, dy):
        x, ends, *weights = ctx.saved_tensors
        dy = dy.contiguous()
        x = x if x.stride(-1) == 1 else x.contiguous()
        dx = torch._grouped_mm(dy, expert_weights.stacked(weights), offs=ends) if ctx.needs_input_grad[0] else None
        add_weight_grads(weights, dy, x, ends)
        # Placeholders so that autograd still runs each weight's DDP hook (which skips the add).
        return (dx, None) + tuple(torch.empty_like(w) for w in weights)


def grouped_linear_accumulating(x: torch.Tensor, weights: Sequence[torch.Tensor], ends: torch.Tensor) -> torch.Tensor:
    """The grouped linear whose weight gradients go into ``main_grad`` (see the module
    docstring; call only where ``accumulates_in_gemm(weights)``)."""
    return _GroupedLinear.apply(x, ends, *weights)
