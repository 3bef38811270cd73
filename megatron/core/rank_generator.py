"""``RankGenerator``: Megatron-Core's rank-group generator (``parallel_state.RankGenerator``)
over this package's ``RankGrid``.

    RankGenerator(tp=2, ep=1, dp=2, pp=2, cp=1, order="tp-cp-ep-dp-pp").get_ranks("tp-pp")

Unlike ``RankGrid``, an order may leave out axes of size 1 (Megatron appends them); an axis
of size > 1 missing from the order is refused. ``get_ranks(token, independent_ep=False)``
lays the grid out without the ``ep`` axis (the dense layout); ``independent_ep=True`` with it.
"""

from __future__ import annotations

from typing import List

from megatron.core.rank_grid import AXES, RankGrid


class RankGenerator:
    def __init__(self, tp: int, ep: int, dp: int, pp: int, cp: int, order: str, rank_offset: int = 0):
        self.tp, self.ep, self.dp, self.pp, self.cp = tp, ep, dp, pp, cp
        self.rank_offset = rank_offset
        self.world_size = tp * dp * pp * cp * ep
        sizes = {"tp": tp, "ep": ep, "dp": dp, "pp": pp, "cp": cp}
        names = [name for name in order.lower().split("-") if name]
        for name in names:
            if name not in AXES:
                raise ValueError(f"invalid parallel order {order!r}: unknown axis {name!r}; axes are {'-'.join(AXES)}")
        for name in AXES:
            if name not in names:
                if sizes[name] != 1:
                    raise ValueError(
                        f"invalid parallel order {order!r}: {name} has size {sizes[name]} but is not in the order; add it"
                    )
                names.append(name)
        self.order = "-".join(names)
        self.name_to_size = sizes

    def _grid(self, independent_ep: bool) -> RankGrid:
        ep = self.ep if independent_ep else 1
        return RankGrid(tp=self.tp, cp=self.cp, ep=ep, dp=self.dp, pp=self.pp, order=self.order, rank_offset=self.rank_offset)

    def get_ranks(self, token: str, independent_ep: bool = False) -> List[List[int]]:
        """The rank groups of the ``-``-joined axes in ``token`` (e.g. ``"tp"``, ``"dp-cp"``)."""
        if not independent_ep and "ep" in token.split("-") and self.ep != 1:
            raise ValueError(f"get_ranks({token!r}) names ep: pass independent_ep=True for expert groups")
        return self._grid(independent_ep).groups(token)
