"""A paged KV cache for continuous batching: sequences of any lengths, at any position,
sharing one pool of fixed-size blocks.

Per layer the pool is key and value [num_blocks, block_size, ng, hn] (this rank's key/value
groups). Each sequence owns a block table (block ids in position order); position p of a
sequence lives in block ``table[p // block_size]`` at slot ``p % block_size``. A step
packs the new tokens of every scheduled sequence (a prefill chunk or one decode token)
into one [s_total, 1] batch; ``begin_step`` names, in packing order, which sequence
each run of tokens belongs to and where it starts. Mamba layers keep one recurrent state
per sequence instead (``recurrent_states``, the same size at any length), made by the
sequence's first run and returned with its blocks.
"""

from __future__ import annotations

import itertools
from typing import Dict, List, Optional, Sequence, Tuple

import torch


class OutOfBlocksError(RuntimeError):
    """The pool has no free block for a sequence that must grow."""


class DynamicInferenceContext:
    """Block pool and block tables; ``attend`` is the attention layers' entry point."""

    def __init__(self, num_blocks: int, block_size: int, window_size: Optional[Tuple[int, int]] = None):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a paged KV cache needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.window_size = window_size
        self.free_blocks: List[int] = list(range(num_blocks))
        self.block_tables: Dict[int, List[int]] = {}
        self.pools: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        self._plan: List[Tuple[int, int, int]] = []
        self.position_ids: Optional[torch.Tensor] = None
        self.materialize_only_last_token_logits = False  # packed sequences: every run's last token is needed
        # Mamba layers: (layer number, sequence id) -> (conv state, SSM state) [1, ...] of one
        # sequence, made by its first run (position 0) and dropped with its blocks.
        self.recurrent_states: Dict[Tuple[int, int], Tuple[torch.Tensor, torch.Tensor]] = {}

    # --- blocks ---------------------------------------------------------------------------
    def blocks_needed(self, sequence_id: int, length: int) -> int:
        """Blocks to add so that ``sequence_id`` can hold ``length`` positions."""
        have = len(self.block_tables.get(sequence_id, ()))
        return max(0, -(-length // self.block_size) - have)

    def reserve(self, sequence_id: int, length: int) -> None:
        """Grow ``sequence_id``'s table to hold ``length`` positions."""
        needed = self.blocks_needed(sequence_id, length)
        if needed > len(self.free_blocks):
            raise OutOfBlocksError(f"sequence {sequence_id} needs {needed} blocks, {len(self.free_blocks)} are free")
        table = self.block_tables.setdefault(sequence_id, [])
        for _ in range(needed):
            table.append(self.free_blocks.pop())

    def release(self, sequence_id: int) -> None:
        """Return a finished sequence's blocks to the pool and drop its recurrent states."""
        self.free_blocks.extend(self.block_tables.pop(sequence_id, []))
        for key in [k for k in self.recurrent_states if k[1] == sequence_id]:
            del self.recurrent_states[key]

    # --- one step ---------------------------------------------------------------------------
    def begin_step(self, plan: Sequence[Tuple[int, int, int]], device: torch.device) -> torch.Tensor:
        """``plan``: (sequence id, first position, token count) per packed run; blocks must be
        reserved. Returns the positions [1, s_total] of the packed tokens."""
        self._plan = list(plan)
        positions = [torch.arange(start, start + n) for _, start, n in self._plan]
        self.position_ids = torch.cat(positions).to(device).unsqueeze(0)
        return self.position_ids

    def recurrent_segments(self, seq_len: int) -> List[Tuple[int, int, int, int]]:
        """For Mamba layers: (sequence id, first packed token, token count, first position) of
        every run of this step, in packing order."""
        offsets = itertools.accumulate([n for _, _, n in self._plan], initial=0)
        return [(sid, first, n, start) for (sid, start, n), first in zip(self._plan, offsets)]

    def rotary_freqs(self, rotary_pos_emb, seq_len: int, device: torch.device) -> torch.Tensor:
        """Rotary angles [s_total, 1, 1, d] of the packed tokens' own positions."""
        table = rotary_pos_emb(int(self.position_ids.max()) + 1, device=device)
        return table[self.position_ids[0]]

    def _pool(self, layer_number: int, key: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        pool = self.pools.get(layer_number)
        if pool is None:
            shape = (self.num_blocks, self.block_size) + tuple(key.shape[2:])
            pool = (torch.empty(shape, dtype=key.dtype, device=key.device),
                    torch.empty(shape, dtype=key.dtype, device=key.device))
            self.pools[layer_number] = pool
        return pool

    def _slots(self, sequence_id: int, first: int, end: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(first, end)
        table = torch.tensor(self.block_tables[sequence_id], dtype=torch.long)
        return table[positions // self.block_size].to(device), (positions % self.block_size).to(device)

    def attend(self, layer_number: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               core_attention) -> torch.Tensor:
        """Store the packed keys/values [s_total, 1, ng, hn] in their sequences' blocks and run
        core attention for each sequence over its cached positions; -> [s_total, 1, np * hn]."""
        pool_k, pool_v = self._pool(layer_number, key)
        outputs, offset = [], 0
        for sequence_id, start, n in self._plan:
            blocks, slots = self._slots(sequence_id, start, start + n, key.device)
            pool_k[blocks, slots] = key[offset:offset + n, 0]
            pool_v[blocks, slots] = value[offset:offset + n, 0]
            first = 0
            if self.window_size is not None and self.window_size[0] >= 0:
                first = max(0, start - self.window_size[0])  # older keys are outside every query's window
            blocks, slots = self._slots(sequence_id, first, start + n, key.device)
            keys = pool_k[blocks, slots].unsqueeze(1)
            values = pool_v[blocks, slots].unsqueeze(1)
            outputs.append(core_attention(query[offset:offset + n], keys, values, None, None))
            offset += n
        return torch.cat(outputs, dim=0)
