"""Typed reads of request fields; each mistake is a RequestError naming the field."""

from __future__ import annotations

from typing import Any, Iterable, Optional

from megatron.inference.errors import RequestError


def check_known_fields(body: dict, known: Iterable[str], route: str) -> None:
    unknown = sorted(set(body) - set(known))
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(unknown)} for {route}; accepted: {', '.join(sorted(known))}",
                           field=unknown[0])


def get_bool(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be a boolean (true or false), got {value!r}", field=name)
    return value


def get_int(body: dict, name: str, default: Optional[int], low: Optional[int] = None,
            high: Optional[int] = None) -> Optional[int]:
    value = body.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {value!r}", field=name)
    _check_range(name, value, low, high)
    return value


def get_float(body: dict, name: str, default: Optional[float], low: Optional[float] = None,
              high: Optional[float] = None, low_open: bool = False) -> Optional[float]:
    value = body.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{name} must be a number, got {value!r}", field=name)
    if low_open and low is not None and value <= low:
        raise RequestError(f"{name} must be > {low}" + (f" and <= {high}" if high is not None else "") +
                           f", got {value}", field=name)
    _check_range(name, value, None if low_open else low, high)
    return float(value)


def _check_range(name: str, value: Any, low, high) -> None:
    if low is not None and value < low or high is not None and value > high:
        bounds = f"between {low} and {high}" if low is not None and high is not None else (
            f">= {low}" if low is not None else f"<= {high}")
        raise RequestError(f"{name} must be {bounds}, got {value}", field=name)


def get_stop(body: dict, name: str = "stop") -> list:
    value = body.get(name)
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value) or len(value) > 4:
        raise RequestError(f"{name} must be a string or a list of up to 4 strings, got {value!r}", field=name)
    return [s for s in value if s]
