"""How each attention layer sees positions: through the sliding window or not
(--window-size, --window-attn-skip-freq), with the rotary embedding or not (--no-rope-freq).

gpt-oss alternates sliding-window and full-attention layers. As in Megatron-LM, an integer
N makes every layer whose 1-based number is divisible by N a full-attention layer (N = 2:
layers 1, 3, 5, ... slide), and a list gives each layer's choice (1 slides, 0 is full).
Llama 4 leaves the rotary embedding out of some layers (NoPE): an integer N skips it in
every layer whose number is divisible by N, a list marks those layers with 1.
"""

from __future__ import annotations

from typing import Optional, Tuple


def layer_window_size(config, layer_number: int) -> Optional[Tuple[int, int]]:
    """The window of layer ``layer_number`` (1-based, counted over the whole model), or None."""
    if config.window_size is None:
        return None
    freq = getattr(config, "window_attn_skip_freq", None)
    if freq is None:
        return config.window_size
    if isinstance(freq, int):
        slides = layer_number % freq != 0
    else:
        slides = bool(freq[layer_number - 1])
    return config.window_size if slides else None


def cache_window_size(config) -> Optional[Tuple[int, int]]:
    """The window an inference KV cache may trim keys to: None when some layers attend to
    every key (each sliding layer still masks to its window)."""
    if getattr(config, "window_attn_skip_freq", None) is not None:
        return None
    return config.window_size


def skips_rope(config, layer_number: int) -> bool:
    """Whether layer ``layer_number`` (1-based, over the whole model) attends without RoPE."""
    freq = getattr(config, "no_rope_freq", None)
    if freq is None:
        return False
    if isinstance(freq, int):
        return layer_number % freq == 0
    return bool(freq[layer_number - 1])
