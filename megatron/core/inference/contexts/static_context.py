"""The KV cache of one fixed batch of sequences that all advance together.

Every sequence of the batch holds the same number of cached positions (the engine feeds
prompts of different lengths token by token until each has its own prompt in, as
Megatron's static engine does), so one offset describes the whole batch and no padding
ever enters the cache.

Layout per layer (this rank's heads only): key and value [max_sequence_length, b, ng, hn],
sequence first like the activations. ``ng`` is the number of key/value groups on this
tensor-parallel rank, so grouped-query models cache ``ng`` heads, not ``np``. Mamba layers
keep a recurrent state instead (``recurrent_states``, see ``megatron.core.ssm.mamba_recurrence``):
one fixed-size state per sequence, filled by the prefill and advanced by every later forward.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from megatron.core.transformer.enums import AttnMaskType


class StaticInferenceContext:
    """KV cache of ``max_batch_size`` sequences of up to ``max_sequence_length`` tokens.

    A model forward with this context appends the new keys/values of each layer at
    ``sequence_len_offset`` and attends to everything cached so far; the caller advances
    the offset with ``increment`` once the forward is done. ``window_size`` (the model's
    ``config.window_size``, (left, right) or None) lets attention read only the keys some
    query of this step can still see: a query at position p sees keys p-left .. p.

    ``use_fixed_shapes()`` switches to the form a CUDA graph can capture: the offset lives
    in a device tensor (``offset_tensor``), new keys/values are scattered at it, and
    attention reads the whole ``max_sequence_length`` cache under a mask of the positions
    not yet reached (and, in sliding-window layers, of those left behind), so every step
    has the same shapes and addresses.
    """

    def __init__(self, max_batch_size: int, max_sequence_length: int, window_size: Optional[Tuple[int, int]] = None):
        if max_batch_size < 1 or max_sequence_length < 1:
            raise ValueError(
                f"an inference context needs max_batch_size >= 1 and max_sequence_length >= 1, got "
                f"{max_batch_size} and {max_sequence_length}"
            )
        self.max_batch_size = max_batch_size
        self.max_sequence_length = max_sequence_length
        self.window_size = window_size
        self.sequence_len_offset = 0
        self.key_value_memory_dict: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        # Mamba layers: (layer number, None) -> (conv state, SSM state) of the whole batch,
        # written by the forward at offset 0 (the prefill) and advanced by each later one.
        self.recurrent_states: Dict[Tuple[int, None], Tuple[torch.Tensor, torch.Tensor]] = {}
        self.offset_tensor: Optional[torch.Tensor] = None
        self.fixed_shapes = False
        # The model computes logits of the last position only (no log-probs wanted).
        self.materialize_only_last_token_logits = False

    def use_fixed_shapes(self, device: torch.device) -> None:
        """Keep the offset in a device tensor from now on (see the class docstring). The
        tensor is made once and kept through ``reset``: a CUDA graph captured over this
        context reads it at the same address in every later batch."""
        if self.offset_tensor is None:
            self.offset_tensor = torch.tensor([self.sequence_len_offset], dtype=torch.long, device=device)
        else:
            self.offset_tensor.fill_(self.sequence_len_offset)
        self.fixed_shapes = True

    def reset(self) -> None:
        """Forget the cached positions (the buffers, the offset tensor and the Mamba state
        tensors are kept for the next batch, which starts with an ordinary prefill)."""
        self.sequence_len_offset = 0
        self.fixed_shapes = False

    def increment(self, num_tokens: int) -> None:
        """Advance past the ``num_tokens`` positions the last forward appended."""
        self.sequence_len_offset += num_tokens
        if self.offset_tensor is not None:
            self.offset_tensor.fill_(self.sequence_len_offset)

    def _buffers(self, layer_number: int, key: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        _, b, ng, hn = key.shape
        if b > self.max_batch_size:
            raise ValueError(f"a batch of {b} sequences does not fit an inference context of max_batch_size {self.max_batch_size}")
        buffers = self.key_value_memory_dict.get(layer_number)
        if buffers is None or buffers[0].shape[1:] != (b, ng, hn) or buffers[0].dtype != key.dtype:
            shape = (self.max_sequence_length, b, ng, hn)
            # Zeros, not empty: fixed-shape decoding reads unwritten slots (masked), and a
            # NaN there would survive the mask (0 x NaN in probs @ values).
            buffers = (torch.zeros(shape, dtype=key.dtype, device=key.device), torch.zeros(shape, dtype=key.dtype, device=key.device))
            self.key_value_memory_dict[layer_number] = buffers
        return buffers

    def recurrent_segments(self, seq_len: int):
        """For Mamba layers: (sequence, first token, token count, first position) of each run of
        tokens this forward feeds; here one run, the whole batch (sequence None) at the offset."""
        return [(None, 0, seq_len, self.sequence_len_offset)]

    def rotary_freqs(self, rotary_pos_emb, seq_len: int, device: torch.device) -> torch.Tensor:
        """Rotary angles [seq_len, 1, 1, d] of the positions this forward feeds."""
        if self.fixed_shapes:
            table = rotary_pos_emb(self.max_sequence_length, device=device)
            return table[self.offset_tensor + torch.arange(seq_len, device=device)]
        return rotary_pos_emb(seq_len, offset=self.sequence_len_offset, device=device)

    def attend(self, layer_number: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               core_attention) -> torch.Tensor:
        """Called by each attention layer: cache key/value [sq, b, ng, hn] and return
        ``core_attention(query, keys, values, mask, mask_type)`` over all cached positions,
        [sq, b, np * hn]. The causal mask of a query block after ``sk - sq`` cached keys
        (and the sliding window) comes from core attention itself."""
        if self.fixed_shapes:
            return self._attend_fixed_shapes(layer_number, query, key, value, core_attention)
        key, value = self.append_key_value(layer_number, key, value)
        return core_attention(query, key, value, None, None)

    def _attend_fixed_shapes(self, layer_number, query, key, value, core_attention) -> torch.Tensor:
        cache_k, cache_v = self._buffers(layer_number, key)
        positions = self.offset_tensor + torch.arange(key.shape[0], device=key.device)  # [sq]
        cache_k.index_copy_(0, positions, key)
        cache_v.index_copy_(0, positions, value)
        # The queries sit at the offset, not at the cache's end: core attention masks the keys
        # after each query (unwritten or stale slots included) and, in a sliding-window layer,
        # those before its window, counted from the queries' real positions.
        return core_attention(query, cache_k, cache_v, None, AttnMaskType.causal, query_offset=self.offset_tensor)

    def append_key_value(self, layer_number: int, key: torch.Tensor, value: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Store key/value [sq, b, ng, hn] of layer ``layer_number`` at the current offset and
        return the keys/values this step attends to, [sk, b, ng, hn], ending with the new ones."""
        start = self.sequence_len_offset
        end = start + key.shape[0]
        if end > self.max_sequence_length:
            raise ValueError(
                f"generation reached {end} tokens, beyond the inference context's max_sequence_length "
                f"{self.max_sequence_length}: ask for fewer tokens or raise --inference-max-seq-length"
            )
        cache_k, cache_v = self._buffers(layer_number, key)
        cache_k[start:end] = key
        cache_v[start:end] = value
        first = 0
        if self.window_size is not None and self.window_size[0] >= 0:
            # Keys older than the window of this step's first query are masked for every
            # query; leave them out (attention builds its mask from the key count).
            first = max(0, start - self.window_size[0])
        return cache_k[first:end], cache_v[first:end]
