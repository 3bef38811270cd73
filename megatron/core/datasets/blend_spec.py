"""Reading a blend (prefixes and optional weights) from command-line tokens."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

Blend = Tuple[List[str], Optional[List[float]]]


def _as_float(token: str) -> Optional[float]:
    try:
        return float(token)
    except ValueError:
        return None


def get_blend_from_list(blend: Optional[Sequence[str]]) -> Optional[Blend]:
    """``["w1", "p1", "w2", "p2"]`` -> ``(["p1", "p2"], [w1, w2])``; ``["p1", "p2"]`` -> ``(["p1", "p2"], None)``.

    A list is weighted only if it has even length and every odd-position token (1st, 3rd,
    ...) parses as a number; otherwise every token is a prefix. Tokens may themselves
    hold several whitespace-separated words (as read from --data-args-path).
    """
    if blend is None:
        return None
    tokens = [str(item) for item in blend]
    if not tokens:
        return None
    if len(tokens) == 1:
        return [tokens[0]], None
    weights = [_as_float(t) for t in tokens[0::2]]
    if len(tokens) % 2 == 0 and all(w is not None for w in weights):
        prefixes = [t.strip() for t in tokens[1::2]]
        if any(w < 0 for w in weights):
            raise ValueError(f"--data-path weights {weights} must be non-negative")
        return prefixes, [float(w) for w in weights]
    return [t.strip() for t in tokens], None
