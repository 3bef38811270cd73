"""Sparse upcycling: the weights of an MoE model made from a trained dense one
(``--moe-use-upcycling``, Megatron's rule; arXiv 2410.07524).

Every layer's dense MLP becomes the experts of the MoE layer at the same place; everything
else (embeddings, attention, norms, dense layers of an MoE model with --moe-layer-freq) is
copied as it is. With granularity g (``--moe-upcycling-granularity``, expert FFN = dense
FFN / g) the dense FFN's neurons are cut into g consecutive pieces (for a gated MLP, the
same g pieces of the gate and of the up projection); expert e takes piece e mod g. The
router keeps its initial weights, except that with g > 1 the rows are tied in blocks of g
(the first E/g rows, each repeated g times), so the g pieces of one copy of the MLP are
routed together.

The experts' weights are scaled so that the MoE layer's output starts at the dense MLP's
scale: the routing weights of the chosen experts sum to 1 when the softmax follows the
top-k (Megatron's default), so the layer's activation is g times too small (each of the g
pieces is weighted 1/g); with --moe-router-pre-softmax they start near 1/E each, so it is
E g / k too small. FC1 and FC2 are both multiplied by that factor's square root (GeLU and
other activations of degree about 1) or cube root (gated units and squared ReLU, whose
output is of degree 2 in FC1). For squared ReLU, and for any activation with g = 1 and
the softmax after the top-k, the first forward of the MoE model equals the dense one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch

_DENSE_FC = ("mlp.linear_fc1.weight", "mlp.linear_fc1.bias", "mlp.linear_fc2.weight", "mlp.linear_fc2.bias")


@dataclass(frozen=True)
class UpcyclingShape:
    """What the expert weights depend on, read from the MoE model's config."""

    num_experts: int
    topk: int
    granularity: int
    pre_softmax: bool
    gated: bool
    squared_relu: bool

    @property
    def expansion_rate(self) -> int:
        return self.num_experts // self.granularity

    def activation_scale(self) -> float:
        """How much larger the MoE layer's activation must be to match the dense MLP's."""
        if self.pre_softmax:
            return self.expansion_rate * self.granularity ** 2 / self.topk
        return float(self.granularity)

    def weight_scale(self) -> float:
        """The factor applied to FC1 and to FC2."""
        degree = 3 if (self.gated or self.squared_relu) else 2
        return self.activation_scale() ** (1.0 / degree)


def check_shape(shape: UpcyclingShape, dense_ffn: int, expert_ffn: int) -> None:
    """ValueError naming the flag when the dense FFN cannot be cut into the experts."""
    if shape.granularity < 1:
        raise ValueError(f"--moe-upcycling-granularity must be >= 1, got {shape.granularity}")
    if dense_ffn != expert_ffn * shape.granularity:
        raise ValueError(f"upcycling cuts the dense FFN of {dense_ffn} into --moe-upcycling-granularity "
                         f"{shape.granularity} experts of {dense_ffn // shape.granularity}, but the experts' FFN is "
                         f"{expert_ffn}: set --moe-ffn-hidden-size {dense_ffn // shape.granularity} (or "
                         "--ffn-hidden-size to the dense model's divided by the granularity)")
    if shape.num_experts % shape.granularity:
        raise ValueError(f"--num-experts {shape.num_experts} must be a multiple of --moe-upcycling-granularity "
                         f"{shape.granularity}: each copy of the dense MLP becomes {shape.granularity} experts")


def _fc1_pieces(weight: torch.Tensor, shape: UpcyclingShape) -> List[torch.Tensor]:
    """FC1 (weight [F or 2F, h] or bias [F or 2F]) cut into the g experts' pieces."""
    if shape.gated:
        gate, up = torch.chunk(weight, 2, dim=0)
        return [torch.cat([g, u], dim=0) for g, u in zip(torch.tensor_split(gate, shape.granularity, dim=0),
                                                         torch.tensor_split(up, shape.granularity, dim=0))]
    return list(torch.tensor_split(weight, shape.granularity, dim=0))


def expert_tensors(key_suffix: str, dense: torch.Tensor, shape: UpcyclingShape) -> List[torch.Tensor]:
    """The g distinct expert tensors made from one dense MLP tensor (expert e takes entry
    e mod g). ``key_suffix``: one of ``linear_fc1.weight``, ``linear_fc1.bias``,
    ``linear_fc2.weight``, ``linear_fc2.bias``."""
    scale = shape.weight_scale()
    if key_suffix.startswith("linear_fc1"):
        return [(piece * scale).contiguous() for piece in _fc1_pieces(dense, shape)]
    if key_suffix == "linear_fc2.weight":
        return [(piece * scale).contiguous() for piece in torch.tensor_split(dense, shape.granularity, dim=1)]
    if key_suffix == "linear_fc2.bias":
        # every expert adds the whole bias (weighted by its routing probability)
        return [dense.clone() for _ in range(shape.granularity)]
    raise ValueError(f"not an MLP tensor: {key_suffix}")


def tied_router(router: torch.Tensor, granularity: int) -> torch.Tensor:
    """Router weight [E, h] (or bias [E]) with its first E/g rows each repeated g times."""
    if granularity == 1:
        return router.clone()
    first = torch.tensor_split(router, granularity, dim=0)[0]
    return torch.repeat_interleave(first, granularity, dim=0)


def upcycle_state_dict(dense: Dict[str, torch.Tensor], moe: Dict[str, torch.Tensor], shape: UpcyclingShape,
                       moe_layer_experts: Dict[str, Sequence[int]]) -> Dict[str, torch.Tensor]:
    """The MoE model's state dict made from the dense model's (both of this rank: the same
    tensor-parallel shards and pipeline stage). ``moe`` is the MoE model's own state dict
    (its router and anything the dense model lacks keep their values); ``moe_layer_experts``
    maps each MoE layer's prefix (``decoder.layers.3.``) to the global indices of the experts
    this rank holds, in local order."""
    out = dict(moe)
    for key in dense.keys() & moe.keys():
        out[key] = dense[key].clone()
    for prefix, experts in moe_layer_experts.items():
        for name in _DENSE_FC:
            dense_key = prefix + name
            if dense_key not in dense:
                continue
            suffix = name[len("mlp."):]
            pieces = expert_tensors(suffix, dense[dense_key], shape)
            for local, expert in enumerate(experts):
                key = f"{prefix}mlp.experts.local_experts.{local}.{suffix}"
                if key not in moe:
                    raise ValueError(f"upcycling: the MoE model has no {key} for the dense {dense_key} (is the "
                                     "MoE model built from the same flags as the dense one, but for --num-experts?)")
                if moe[key].shape != pieces[expert % shape.granularity].shape:
                    raise ValueError(f"upcycling: {key} is {tuple(moe[key].shape)} but the dense {dense_key} "
                                     f"gives {tuple(pieces[expert % shape.granularity].shape)}")
                out[key] = pieces[expert % shape.granularity].to(moe[key].dtype)
        for name in ("mlp.router.weight", "mlp.router.bias"):
            if prefix + name in moe:
                out[prefix + name] = tied_router(moe[prefix + name], shape.granularity)
    return out
