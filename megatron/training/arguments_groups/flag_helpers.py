"""Small helpers that give every argument group Megatron's flag conventions.

Megatron spells a boolean that is on by default as an "off switch": ``--no-foo`` (and, at
HEAD, also ``--disable-foo``), both ``store_false`` into ``foo``. Flags whose values are
tuples or patterns get the small ``type=`` parsers defined here.
"""

from __future__ import annotations

import argparse
from typing import Iterable, Optional, Tuple


def add_off_switch(
    group: argparse._ArgumentGroup,
    dest: str,
    help: Optional[str] = None,
    extra_names: Iterable[str] = (),
) -> None:
    """Add ``--no-<dest>`` and ``--disable-<dest>`` (store_false into ``dest``, default True).

    ``extra_names`` are further spellings Megatron has used for the same switch.
    """
    stem = dest.replace("_", "-")
    names = [f"--no-{stem}", f"--disable-{stem}", *extra_names]
    group.add_argument(*names, action="store_false", dest=dest, help=help)


def int_tuple(text: str) -> Tuple[int, ...]:
    """Parse ``"4096,0"`` or ``"(4096, 0)"`` into ``(4096, 0)`` (used by --window-size)."""
    parts = [p for p in text.strip("()[] ").split(",") if p.strip()]
    try:
        return tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 4096,0, got {text!r}")


def int_or_pattern(text: str):
    """Parse an integer N, or a list pattern such as ``([1]*3+[0])*2`` into a list of ints.

    Megatron's --moe-layer-freq and --window-attn-skip-freq accept both forms. The pattern is
    evaluated by a tiny parser that only knows integers, lists, ``+``, ``*`` and parentheses.
    """
    text = text.strip()
    if "[" not in text:
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer or a list pattern, got {text!r}")
    return _PatternParser(text).parse()


class _PatternParser:
    """Recursive-descent parser for ``expr := term ('+' term)*``, ``term := atom ('*' int)*``,
    ``atom := int | '[' int (',' int)* ']' | '(' expr ')'``."""

    def __init__(self, text: str) -> None:
        self.text = text.replace(" ", "")
        self.pos = 0

    def parse(self) -> list:
        value = self._expr()
        if self.pos != len(self.text) or not isinstance(value, list):
            raise argparse.ArgumentTypeError(f"cannot parse layer pattern {self.text!r}")
        return value

    def _peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def _expr(self):
        value = self._term()
        while self._peek() == "+":
            self.pos += 1
            value = value + self._term()
        return value

    def _term(self):
        value = self._atom()
        while self._peek() == "*":
            self.pos += 1
            value = value * self._int()
        return value

    def _int(self) -> int:
        start = self.pos
        while self._peek().isdigit():
            self.pos += 1
        if start == self.pos:
            raise argparse.ArgumentTypeError(f"expected a number at position {start} of {self.text!r}")
        return int(self.text[start : self.pos])

    def _atom(self):
        if self._peek() == "(":
            self.pos += 1
            value = self._expr()
            self._expect(")")
            return value
        if self._peek() == "[":
            self.pos += 1
            items = [self._int()]
            while self._peek() == ",":
                self.pos += 1
                items.append(self._int())
            self._expect("]")
            return items
        return self._int()

    def _expect(self, char: str) -> None:
        if self._peek() != char:
            raise argparse.ArgumentTypeError(f"expected {char!r} at position {self.pos} of {self.text!r}")
        self.pos += 1
