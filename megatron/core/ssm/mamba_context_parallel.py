"""Context parallelism for the Mamba-2 mixer: an all-to-all from sequence shards to head shards.

A context-parallel rank holds its load-balanced share of each sequence (chunks i and
2CP-1-i of 2 x CP, ``transformer/context_parallel/layout.py``). The in-projection, the
gated norm and the out-projection are per token and run on that share as usual. The conv1d
and the SSD scan need every position of a sequence, in order, so x, B, C and dt go through
one all-to-all: CP rank c receives the whole sequence for block c of this tensor-parallel
rank's heads, with the groups those heads read, puts the chunks in position order and runs
the conv and the scan; the output goes back by the inverse all-to-all. z never moves (the
gate is applied where the norm runs), and no recurrent state crosses ranks.

Groups: with G/tp a multiple of CP, rank c takes group block c; with CP a multiple of G/tp,
consecutive ranks share a group (each takes some of its heads), that group's B and C go to
each of them and autograd sums their gradients.

Context parallelism shards no weights: every CP rank holds the mixer's parameters whole and
uses the slices of conv1d, dt_bias, A_log and D that belong to its heads and groups. A
rank's gradient is therefore zero outside its slices, and the gradient reduction over the
data x context parallel ranks adds the slices into the full gradient.
"""

from __future__ import annotations

import dataclasses
from typing import List, Tuple

import torch
import torch.distributed as dist

from megatron.core.process_groups import group_rank, group_size
from megatron.core.transformer.context_parallel.all_to_all import head_to_seq, seq_to_head
from megatron.core.transformer.context_parallel.layout import load_balanced_chunk_ids


@dataclasses.dataclass
class HeadShare:
    """The heads a conv + scan runs over and the parameter values they use: the mixer's whole
    tensor-parallel share, or one context-parallel rank's block of it."""

    nheads: int
    ngroups: int
    conv_weight: torch.Tensor  # [x ; B ; C channels, k]
    conv_bias: torch.Tensor
    dt_bias: torch.Tensor
    A_log: torch.Tensor
    D: torch.Tensor


def check_context_parallel_split(nheads_local: int, ngroups_local: int, cp: int) -> None:
    """ValueError naming the flags when a tensor-parallel rank's heads and groups cannot be
    dealt out over ``cp`` context-parallel ranks."""
    if cp == 1:
        return
    if nheads_local % cp:
        raise ValueError(
            f"the SSM heads of a tensor-parallel rank ({nheads_local}: --mamba-num-heads, or 2 x --hidden-size / "
            f"--mamba-head-dim, over --tensor-model-parallel-size) must be divisible by --context-parallel-size "
            f"{cp}: each context-parallel rank scans a block of the heads over the whole sequence"
        )
    if ngroups_local % cp and cp % ngroups_local:
        raise ValueError(
            f"--mamba-num-groups / --tensor-model-parallel-size = {ngroups_local} groups per tensor-parallel rank "
            f"and --context-parallel-size {cp} must divide one another: each context-parallel rank takes whole "
            "groups, or several ranks share one"
        )


def _position_order(cp: int) -> Tuple[List[int], List[int]]:
    """(natural, ranked): the 2 x cp chunks of a gathered sequence sit in rank order
    (rank r's two chunks, r = 0..cp-1); ``natural[k]`` is where chunk k of the sequence
    sits, ``ranked[j]`` which chunk of the sequence sits at place j."""
    ranked = [c for r in range(cp) for c in load_balanced_chunk_ids(r, cp)]
    natural = [ranked.index(k) for k in range(2 * cp)]
    return natural, ranked


class MambaContextParallel:
    """The all-to-alls and parameter slices of one mixer over the context-parallel group."""

    def __init__(self, cp_group, nheads_local: int, ngroups_local: int, headdim: int, d_state: int):
        self.group = cp_group
        self.cp, self.rank = group_size(cp_group), group_rank(cp_group)
        check_context_parallel_split(nheads_local, ngroups_local, self.cp)
        self.members = [dist.get_global_rank(cp_group, i) for i in range(self.cp)]
        self.nheads_local, self.ngroups_local = nheads_local, ngroups_local
        self.headdim, self.d_state = headdim, d_state
        self.nheads = nheads_local // self.cp
        # ranks sharing one group (1 when each rank takes whole groups)
        self.group_repeat = max(self.cp // ngroups_local, 1)
        self.ngroups = max(ngroups_local // self.cp, 1)
        self.natural, self.ranked = _position_order(self.cp)

    def share(self, whole: HeadShare) -> HeadShare:
        """This rank's block of the tensor-parallel share: its heads, its groups."""
        heads = slice(self.rank * self.nheads, (self.rank + 1) * self.nheads)
        group_block = self.rank // self.group_repeat
        d, bc, bc_rank = self.nheads_local * self.headdim, self.ngroups_local * self.d_state, self.ngroups * self.d_state

        def channels(t: torch.Tensor) -> torch.Tensor:
            x, B, C = torch.split(t, [d, bc, bc], dim=0)
            x = x[heads.start * self.headdim:heads.stop * self.headdim]
            start = group_block * bc_rank
            return torch.cat([x, B[start:start + bc_rank], C[start:start + bc_rank]], dim=0)

        return HeadShare(self.nheads, self.ngroups, channels(whole.conv_weight), channels(whole.conv_bias),
                         whole.dt_bias[heads], whole.A_log[heads], whole.D[heads])

    def to_heads(self, xbc: torch.Tensor, dt: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """xbc [s/cp, b, conv channels of the TP share], raw dt [s/cp, b, heads of the TP share]
        (this rank's tokens) -> xbc [b, s, this rank's conv channels], dt [b, s, its heads]
        (every token, in position order)."""
        s, b, _ = xbc.shape
        cp, hd, n = self.cp, self.nheads * self.headdim, self.d_state
        x, B, C = torch.split(xbc, [self.nheads_local * self.headdim, self.ngroups_local * n,
                                    self.ngroups_local * n], dim=-1)

        def per_rank_groups(t: torch.Tensor) -> torch.Tensor:
            # [s, b, G*n] -> [s, b, cp, groups of a rank * n]; shared groups repeat on consecutive ranks
            t = t.reshape(s, b, self.ngroups_local, n)
            if self.group_repeat > 1:
                t = t.repeat_interleave(self.group_repeat, dim=2)
            return t.reshape(s, b, cp, self.ngroups * n)

        outgoing = torch.cat([x.reshape(s, b, cp, hd), per_rank_groups(B), per_rank_groups(C),
                              dt.reshape(s, b, cp, self.nheads)], dim=-1)  # [s, b, cp, per rank]
        gathered = seq_to_head(outgoing, self.members, self.rank, self.group)  # [cp*s, b, 1, per rank]
        chunks = gathered.reshape(cp * s, b, -1).chunk(2 * cp, dim=0)
        ordered = torch.cat([chunks[place] for place in self.natural], dim=0).transpose(0, 1)  # [b, cp*s, per]
        return torch.split(ordered, [ordered.shape[-1] - self.nheads, self.nheads], dim=-1)

    def to_sequence(self, y: torch.Tensor) -> torch.Tensor:
        """y [b, s, this rank's heads x head dim] (every token, position order) -> [b, s/cp,
        heads of the TP share x head dim] (this rank's tokens)."""
        b, s_full, width = y.shape
        chunks = y.transpose(0, 1).chunk(2 * self.cp, dim=0)
        ranked = torch.cat([chunks[k] for k in self.ranked], dim=0).reshape(s_full, b, 1, width)
        local = head_to_seq(ranked, self.members, self.rank, self.group)  # [s/cp, b, cp, width]
        return local.reshape(s_full // self.cp, b, self.cp * width).transpose(0, 1)
