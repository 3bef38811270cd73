"""A tiny MoE layer built the same way on any layout, and a naive reference forward."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron.core.transformer.init_rng import initialization_stream, layout_independent_initialization
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.transformer_config import TransformerConfig

SEQ, BATCH, HIDDEN, EXPERTS = 8, 4, 16, 4


def moe_config(**overrides) -> TransformerConfig:
    kwargs = dict(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, ffn_hidden_size=32, num_moe_experts=EXPERTS,
        moe_router_topk=2, hidden_dropout=0.0, attention_dropout=0.0, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, use_cpu_initialization=True, init_method_std=0.2,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_layer(config, pg_collection=None, seed: int = 7) -> MoELayer:
    """Layer 1 with weights that depend only on ``seed`` (not on the layout)."""
    model_parallel_cuda_manual_seed(seed)
    with layout_independent_initialization(seed), initialization_stream("layer1"):
        return MoELayer(config, layer_number=1, pg_collection=pg_collection)


def inputs(seed: int = 3):
    """(hidden [SEQ, BATCH, HIDDEN], output gradient of the same shape)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(SEQ, BATCH, HIDDEN, generator=gen), torch.randn(SEQ, BATCH, HIDDEN, generator=gen)


def reference_forward(layer: MoELayer, hidden: torch.Tensor) -> torch.Tensor:
    """sum over each token's experts of prob * expert(token), one token at a time (TP = EP = 1)."""
    tokens = hidden.reshape(-1, hidden.size(-1))
    probs, routing_map = layer.router(tokens, seq_length=hidden.size(0), batch_size=hidden.size(1))
    rows = []
    for t in range(tokens.size(0)):
        row = torch.zeros_like(tokens[t])
        for e in routing_map[t].nonzero().flatten().tolist():
            row = row + probs[t, e] * layer.experts.local_experts[e](tokens[t : t + 1])[0]
        rows.append(row)
    return torch.stack(rows).view_as(hidden)


class HostRead(AssertionError):
    """Raised by ``forbid_host_reads`` when code reads a tensor's value on the host."""


def forbid_host_reads(monkeypatch) -> None:
    """Turn every Python-level way to read a tensor's value on the host (.item, .tolist,
    nonzero, bool/int/float of a tensor, which wait for the GPU there) into ``HostRead``.
    Kernels that synchronize inside C++ (repeat_interleave without output_size, boolean
    indexing) are not caught; the GPU tests use CUDA's sync debug mode for those."""

    def forbid(name):
        def call(*args, **kwargs):
            raise HostRead(f"{name} reads a device value on the host")
        return call

    for name in ("item", "tolist", "nonzero", "__bool__", "__int__", "__index__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, forbid(name))
    monkeypatch.setattr(torch, "nonzero", forbid("torch.nonzero"))
