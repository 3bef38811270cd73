"""Incremental text of a generation: what can be sent to a streaming client after each
token, and the final text cut at the first stop string.

Text is held back while it could still be the start of a stop string (a client must never
see part of a stop string that later completes) or while it ends in an incomplete UTF-8
character (a byte-level tokenizer's piece decodes to U+FFFD until the rest arrives).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> Tuple[str, Optional[str]]:
    """(text before the earliest stop string, that stop string) or (text, None)."""
    best, found = len(text), None
    for stop in stop_strings:
        index = text.find(stop)
        if index != -1 and index < best:
            best, found = index, stop
    return text[:best], found


def _held_back(text: str, stop_strings: Sequence[str]) -> int:
    """Characters at the end of ``text`` that might begin a stop string or a character."""
    hold = 0
    for stop in stop_strings:
        for length in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:length]):
                hold = max(hold, length)
                break
    if text.endswith("\ufffd"):
        hold = max(hold, len(text) - len(text.rstrip("\ufffd")))
    return hold


class TextStream:
    """Feed generated tokens with ``add``; each returns the new text that is safe to send.
    ``finish`` returns the rest. ``text`` is everything, cut at the first stop string;
    stop tokens (``stop_token_ids``) add no text."""

    def __init__(self, continuation: Callable[[List[int]], str], stop_strings: Sequence[str],
                 stop_token_ids: Sequence[int]):
        self._continuation = continuation
        self._stop_strings = list(stop_strings)
        self._stop_ids = set(stop_token_ids)
        self._tokens: List[int] = []
        self._sent = 0
        self.text = ""
        self.stopped = False

    def add(self, token: int) -> str:
        if self.stopped or token in self._stop_ids:
            self.stopped = self.stopped or token in self._stop_ids
            return ""
        self._tokens.append(token)
        text, stop = cut_at_stop(self._continuation(self._tokens), self._stop_strings)
        self.text = text
        if stop is not None:
            self.stopped = True
            return self._flush(len(text))
        return self._flush(len(text) - _held_back(text, self._stop_strings))

    def finish(self) -> str:
        return self._flush(len(self.text))

    def _flush(self, upto: int) -> str:
        if upto <= self._sent:
            return ""
        delta = self.text[self._sent:upto]
        self._sent = upto
        return delta
