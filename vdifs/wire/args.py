"""Checked access to the arguments of a request.

Requests arrive as msgpack maps from other processes, so every value is
checked at the edge, where the handler takes it: exact types (a bool is not
an int, a float is not an int), ranges, and presence. Anything else is an
`InvalidArgument` with a one-line reason. A `KeyError` or `TypeError` that
escapes a handler is then a bug in the handler, and is reported as one.
"""

from __future__ import annotations

from typing import Any

from vdifs.errors import InvalidArgument

U64 = (1 << 64) - 1


def _get(args: dict[str, Any], key: str, default: Any) -> Any:
    if not isinstance(args, dict):
        raise InvalidArgument("arguments must be a map")
    if key in args:
        return args[key]
    if default is _REQUIRED:
        raise InvalidArgument(f"missing argument {key!r}")
    return default


class _Required:
    def __repr__(self) -> str:
        return "required"


_REQUIRED: Any = _Required()


def integer(args: dict[str, Any], key: str, lo: int = 0, hi: int = U64, *, default: Any = _REQUIRED) -> Any:
    """An int in lo..hi (bools, floats and strings are refused)."""
    v = _get(args, key, default)
    if v is default and default is not _REQUIRED:
        return v
    if type(v) is not int:
        raise InvalidArgument(f"{key} must be an integer, not {type(v).__name__}")
    if not lo <= v <= hi:
        raise InvalidArgument(f"{key} {v} is out of range {lo}..{hi}")
    return v


def text(args: dict[str, Any], key: str, *, max_len: int = 4096, default: Any = _REQUIRED) -> Any:
    """A str of at most `max_len` characters."""
    v = _get(args, key, default)
    if v is default and default is not _REQUIRED:
        return v
    if not isinstance(v, str):
        raise InvalidArgument(f"{key} must be a string, not {type(v).__name__}")
    if len(v) > max_len:
        raise InvalidArgument(f"{key} is longer than {max_len} characters")
    return v


def blob(args: dict[str, Any], key: str, *, max_len: int | None = None, default: Any = _REQUIRED) -> Any:
    """Bytes (a bytearray as received from a data frame is kept as it is)."""
    v = _get(args, key, default)
    if v is default and default is not _REQUIRED:
        return v
    if not isinstance(v, (bytes, bytearray)):
        raise InvalidArgument(f"{key} must be bytes, not {type(v).__name__}")
    if max_len is not None and len(v) > max_len:
        raise InvalidArgument(f"{key} is longer than {max_len} bytes")
    return v


def flag(args: dict[str, Any], key: str, *, default: bool = False) -> bool:
    """A bool (absent: `default`)."""
    v = _get(args, key, default)
    if not isinstance(v, bool):
        raise InvalidArgument(f"{key} must be true or false, not {type(v).__name__}")
    return v


def mapping(args: dict[str, Any], key: str, *, default: Any = _REQUIRED) -> Any:
    """A map (its contents are the caller's to check)."""
    v = _get(args, key, default)
    if v is default and default is not _REQUIRED:
        return v
    if not isinstance(v, dict):
        raise InvalidArgument(f"{key} must be a map, not {type(v).__name__}")
    return v


def int_list(args: dict[str, Any], key: str, lo: int = 0, hi: int = U64, *, max_items: int = 1 << 16) -> list[int]:
    """A list of at most `max_items` ints in lo..hi."""
    v = _get(args, key, _REQUIRED)
    if not isinstance(v, list):
        raise InvalidArgument(f"{key} must be a list, not {type(v).__name__}")
    if len(v) > max_items:
        raise InvalidArgument(f"{key} holds more than {max_items} items")
    for x in v:
        if type(x) is not int or not lo <= x <= hi:
            raise InvalidArgument(f"{key} must hold integers in {lo}..{hi}")
    return v
