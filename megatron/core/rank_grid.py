"""Pure rank arithmetic for the parallel grid (no torch.distributed).

Megatron lays ranks out on an N-dimensional grid whose axes are named by an order
string such as ``tp-cp-ep-dp-pp``. The leftmost axis varies fastest, so with the default
order

    global_rank = offset + tp_r + cp_r*TP + dp_r*TP*CP + pp_r*TP*CP*DP

A group for a set of axes (say ``dp-cp``) holds all ranks that agree on every *other*
coordinate. Everything here is plain integers so that it can be unit-tested for world
sizes up to thousands without starting a process group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

DEFAULT_ORDER = "tp-cp-ep-dp-pp"
AXES = ("tp", "cp", "ep", "dp", "pp")


def parse_order(order: str) -> List[str]:
    """Split and validate an order string such as ``tp-cp-ep-dp-pp``."""
    names = order.split("-")
    if sorted(names) != sorted(AXES):
        raise ValueError(
            f"invalid parallel order {order!r}: it must name each of {'-'.join(AXES)} exactly "
            f"once, joined by '-' (for example '{DEFAULT_ORDER}' or 'tp-cp-ep-pp-dp')"
        )
    return names


def groups_for(sizes: Sequence[int], mask: Sequence[bool]) -> List[List[int]]:
    """Rank groups of a grid whose axes have ``sizes`` (fastest first).

    ``mask[i]`` is True for the axes that vary inside one group. Returns the groups in
    the order of the outer (unmasked) coordinates, each group sorted by the inner ones,
    which is the order Megatron's ``generate_masked_orthogonal_rank_groups`` produces.
    """
    strides = []
    stride = 1
    for size in sizes:
        strides.append(stride)
        stride *= size
    inner = [i for i, m in enumerate(mask) if m]
    outer = [i for i, m in enumerate(mask) if not m]

    def coords(index: int, axes: List[int]) -> List[int]:
        out = []
        for axis in axes:
            out.append(index % sizes[axis])
            index //= sizes[axis]
        return out

    n_inner = 1
    for axis in inner:
        n_inner *= sizes[axis]
    n_outer = 1
    for axis in outer:
        n_outer *= sizes[axis]

    groups = []
    for o in range(n_outer):
        base = sum(c * strides[a] for c, a in zip(coords(o, outer), outer))
        groups.append(
            [base + sum(c * strides[a] for c, a in zip(coords(i, inner), inner)) for i in range(n_inner)]
        )
    return groups


@dataclass(frozen=True)
class RankGrid:
    """One grid of ranks: sizes of the five axes and their order.

    ``rank_offset`` shifts every rank (Megatron uses it for heterogeneous layouts).
    """

    tp: int = 1
    cp: int = 1
    ep: int = 1
    dp: int = 1
    pp: int = 1
    order: str = DEFAULT_ORDER
    rank_offset: int = 0

    def __post_init__(self) -> None:
        for name in AXES:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} size must be a positive integer, got {value!r}")
        parse_order(self.order)

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.ep * self.dp * self.pp

    @property
    def axis_names(self) -> List[str]:
        return parse_order(self.order)

    @property
    def axis_sizes(self) -> List[int]:
        return [getattr(self, name) for name in self.axis_names]

    def groups(self, token: str) -> List[List[int]]:
        """Groups for a ``-``-joined set of axes, such as ``tp``, ``dp-cp`` or ``tp-pp``."""
        wanted = token.split("-")
        for name in wanted:
            if name not in AXES:
                raise ValueError(f"unknown parallel axis {name!r} in {token!r}; axes are {AXES}")
        names = self.axis_names
        mask = [name in wanted for name in names]
        return [[r + self.rank_offset for r in g] for g in groups_for(self.axis_sizes, mask)]

    def coordinates(self, rank: int) -> Dict[str, int]:
        """The coordinate of ``rank`` along each axis."""
        local = rank - self.rank_offset
        if not 0 <= local < self.world_size:
            raise ValueError(f"rank {rank} is outside this grid of {self.world_size} ranks")
        out = {}
        for name, size in zip(self.axis_names, self.axis_sizes):
            out[name] = local % size
            local //= size
        return out

    def rank_of(self, **coords: int) -> int:
        """Global rank of the given coordinates (missing axes are 0)."""
        rank, stride = 0, 1
        for name, size in zip(self.axis_names, self.axis_sizes):
            c = coords.get(name, 0)
            if not 0 <= c < size:
                raise ValueError(f"coordinate {name}={c} is outside 0..{size - 1}")
            rank += c * stride
            stride *= size
        return rank + self.rank_offset


def embedding_ranks(pp_group: Sequence[int]) -> List[int]:
    """Ranks that hold the word embeddings: the first and the last pipeline stage."""
    return [pp_group[0]] if len(pp_group) == 1 else [pp_group[0], pp_group[-1]]


def position_embedding_ranks(pp_group: Sequence[int]) -> List[int]:
    """Ranks that hold the learned position embeddings: the first pipeline stage."""
    return [pp_group[0]]
