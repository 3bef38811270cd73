"""The decode step of the static engine as one CUDA graph.

A decode step (one token per sequence) has the same shapes at every position once the KV
cache is read whole under a mask (``StaticInferenceContext.use_fixed_shapes``). The graph
is captured on the first decode step of a ``generate`` call, after two warm-up runs on a
side stream (they write the same keys/values the real step writes), and replayed for the
others: the host launches one graph instead of hundreds of kernels, which is what bounds
small-batch decoding. Eager execution stays the reference (``use_cuda_graphs=False``).

Mamba layers advance their recurrent states in place at every step; the warm-up runs
would advance them too (a KV write at the same slot repeats harmlessly, a recurrence does
not), so the states are saved before the warm-ups and put back after them.

Supported: one rank (no tensor/pipeline parallelism); MoE layers whose dispatch needs no
host synchronization (bf16 grouped GEMMs on Hopper or newer, dropless or padded to capacity). ``decode_graph_supported``
says why not.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch


def decode_graph_supported(model: torch.nn.Module, model_parallel: bool) -> Optional[str]:
    """None when the decode step can be captured, else the reason it cannot."""
    config = model.config
    if not torch.cuda.is_available() or next(model.parameters()).device.type != "cuda":
        return "the model is not on a CUDA device"
    if model_parallel:
        return "tensor or pipeline parallelism"
    if getattr(config, "num_moe_experts", None):
        parameter = next(model.parameters())
        return _moe_capture_refusal(config, parameter.dtype, torch.cuda.get_device_capability(parameter.device))
    return None


def _moe_capture_refusal(config, dtype: torch.dtype, capability) -> Optional[str]:
    """MoE layers are captured where their dispatch never asks the GPU for a size, as in
    training graphs (docs/moe.md, "dispatch without host synchronization"): grouped GEMMs
    (``torch._grouped_mm``: bf16, Hopper or newer) with dropless routing or every expert
    padded to its capacity, on one expert rank."""
    if dtype != torch.bfloat16 or capability[0] < 9:
        return (f"MoE layers in {dtype} on a GPU of compute capability {capability[0]}.{capability[1]} (the grouped "
                "GEMM that needs no host synchronization takes bf16 on Hopper or newer)")
    if getattr(config, "expert_model_parallel_size", 1) > 1:
        return "MoE layers with expert parallelism"
    if not config.moe_grouped_gemm:
        return "MoE layers without --moe-grouped-gemm (the per-expert loop splits tokens by counts read on the host)"
    if config.moe_expert_capacity_factor is not None and not config.moe_pad_expert_input_to_capacity:
        return ("MoE token dropping without --moe-pad-expert-input-to-capacity (the kept-token count is read on "
                "the host)")
    if config.moe_router_load_balancing_type == "sinkhorn":
        return "the sinkhorn router (its iterations stop on a tolerance read on the host)"
    return None


_compiled_models: "weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module]" = weakref.WeakKeyDictionary()


def _compiled(model: torch.nn.Module):
    """One ``torch.compile`` wrapper per model, so later calls reuse its compiled code."""
    if model not in _compiled_models:
        _compiled_models[model] = torch.compile(model, dynamic=False)
    return _compiled_models[model]


class DecodeGraph:
    """forward(tokens [b, 1], positions [b, 1]) -> logits [b, 1, V] of one decode step,
    replayed from a graph bound to ``context``'s buffers (valid for this context only).

    ``compile_step``: capture the step as compiled by ``torch.compile`` (Inductor fuses the
    norms, rotary embedding, activations and residual adds into a few kernels; at small
    batch a decode step is bound by the number of kernels, not their work). Compiled once
    per batch size and cache length; an eager run, then two compiled warm-up runs (the
    first compiles), outside the capture.
    """

    def __init__(self, model: torch.nn.Module, context, tokens: torch.Tensor, positions: torch.Tensor,
                 compile_step: bool = False):
        self.model = model
        step = _compiled(model) if compile_step else model
        self.context = context
        self.tokens = tokens.clone()
        self.positions = positions.clone()
        saved = [(state, state.clone()) for pair in context.recurrent_states.values() for state in pair]
        # An eager run first when compiling: choices made on the host per shape (whether
        # cuDNN needs K/V repeated) are then known while tracing, and stay in one graph.
        warmups = [model, step, step] if compile_step else [step, step]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for run in warmups:
                run(self.tokens, self.positions, None, inference_context=context)
                for state, before in saved:
                    state.copy_(before)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.logits = step(self.tokens, self.positions, None, inference_context=context)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.graph.replay()
        return self.logits
