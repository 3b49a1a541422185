"""Checks for data read from disk (recipes, plans, checkpoints): nothing there is trusted.

Every check names the field by its JSON path (``$.passes[2].plan.groups["conv1"].keep[3]``)
and raises :class:`ValidationError`, a SurgeryError: the CLI prints one line, exit 2.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable
from typing import Any

from .errors import SurgeryError

# Bounds for sizes read from a file: far above any real model, far below what would exhaust memory.
MAX_CHANNELS = 1 << 20  # channels, features, classes, tokens per axis
MAX_RANK = 4096  # factor ranks
MAX_ITEMS = 1 << 20  # entries of one list (kept indices, layer names)
MAX_DEPTH = 32  # nesting of a JSON document


class ValidationError(SurgeryError):
    """A field read from disk is wrong: the message starts with its JSON path."""

    def __init__(self, where: str, problem: str):
        self.where, self.problem = where, problem
        super().__init__(f"{where}: {problem}")


def at(where: str, key: str | int) -> str:
    """The JSON path of ``key`` under ``where``: ``$.a`` + 'b' -> ``$.a.b``, + 3 -> ``$.a[3]``."""
    if isinstance(key, int):
        return f"{where}[{key}]"
    if key.isidentifier():
        return f"{where}.{key}"
    return f"{where}[{json.dumps(key)}]"


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def expect_dict(value: Any, where: str, *, allowed: Collection[str] | None = None,
                required: Iterable[str] = ()) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValidationError(where, f"must be an object, not {_kind(value)}")
    for key in required:
        if key not in value:
            raise ValidationError(at(where, key), "is missing")
    if allowed is not None:
        unknown = sorted(k for k in value if k not in allowed)
        if unknown:
            raise ValidationError(at(where, unknown[0]), f"unknown key (known: {', '.join(sorted(allowed))})")
    return value


def expect_list(value: Any, where: str, *, max_len: int = MAX_ITEMS, min_len: int = 0) -> list[Any]:
    if not isinstance(value, list):
        raise ValidationError(where, f"must be a list, not {_kind(value)}")
    if not min_len <= len(value) <= max_len:
        raise ValidationError(where, f"must hold {min_len}..{max_len} items, not {len(value)}")
    return value


def expect_int(value: Any, where: str, *, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(where, f"must be an integer, not {_kind(value)}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"{'-inf' if lo is None else lo}..{'inf' if hi is None else hi}"
        raise ValidationError(where, f"{value} is out of range {bounds}")
    return value


def expect_number(value: Any, where: str, *, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValidationError(where, f"must be a number, not {_kind(value)}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValidationError(where, f"{value} is out of range {lo}..{hi}")
    return float(value)


def expect_bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ValidationError(where, f"must be true or false, not {_kind(value)}")
    return value


def expect_str(value: Any, where: str, *, choices: Collection[str] | None = None, max_len: int = 4096) -> str:
    if not isinstance(value, str):
        raise ValidationError(where, f"must be a string, not {_kind(value)}")
    if len(value) > max_len:
        raise ValidationError(where, f"is {len(value)} characters long (at most {max_len})")
    if choices is not None and value not in choices:
        raise ValidationError(where, f"{value!r} is not one of {', '.join(sorted(choices))}")
    return value


def expect_name(value: Any, where: str, known: Collection[str], what: str = "name") -> str:
    """A name that must exist in the graph (a module, a node, a channel group)."""
    expect_str(value, where)
    if value not in known:
        raise ValidationError(where, f"{what} {value!r} does not exist in this model")
    return value


def expect_indices(value: Any, where: str, size: int, *, min_len: int = 1) -> list[int]:
    """Channel or block indices: integers in [0, size), unique."""
    expect_list(value, where, min_len=min_len, max_len=max(size, min_len))
    seen: set[int] = set()
    for i, v in enumerate(value):
        expect_int(v, at(where, i), lo=0, hi=size - 1)
        if v in seen:
            raise ValidationError(at(where, i), f"index {v} appears twice")
        seen.add(v)
    return value


def expect_ranges(value: Any, where: str, size: int, *, min_len: int = 1) -> list[int]:
    """Indices written as compact ranges ("0-3,5,7-9"): in [0, size), unique; parsed without expanding
    a range before its bounds are checked (a tampered "0-999999999" costs nothing)."""
    digits = len(str(max(size, 1)))
    expect_str(value, where, max_len=max(16, size * (2 * digits + 2)))  # "a-b," per index at most
    out: list[int] = []
    seen: set[int] = set()
    for part in value.split(","):
        a, dash, b = part.partition("-")
        if not (a.isdigit() and a.isascii() and (not dash or (b.isdigit() and b.isascii()))):
            raise ValidationError(where, f"{part!r} is not an index or a range a-b (in {_short(value)})")
        if max(len(a), len(b)) > digits + 1:  # too big to be in range; int() of 5000 digits would raise
            raise ValidationError(where, f"index {_short(max(a, b, key=len), 12)} is out of range 0..{size - 1}")
        lo, hi = int(a), int(b) if dash else int(a)
        for v in (lo, hi):
            if v >= size:
                raise ValidationError(where, f"index {v} is out of range 0..{size - 1}")
        if hi < lo:
            raise ValidationError(where, f"range {part!r} runs backwards")
        for v in range(lo, hi + 1):  # at most size + 1 steps in all: a repeat stops it
            if v in seen:
                raise ValidationError(where, f"index {v} appears twice")
            seen.add(v)
            out.append(v)
    if len(out) < min_len:
        raise ValidationError(where, f"must hold at least {min_len} index(es), not {len(out)}")
    return out


def _short(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def json_depth(text: str) -> int:
    """Deepest nesting of brackets in a JSON text (strings skipped), without parsing it."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def parse_json(text: str, what: str, *, max_depth: int = MAX_DEPTH, allow_nan: bool = True) -> Any:
    """Parse a JSON document read from disk; too deep or malformed (or NaN, if refused) is a ValidationError."""
    depth = json_depth(text)
    if depth > max_depth:
        raise ValidationError("$", f"{what} nests {depth} levels deep (at most {max_depth})")

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        return json.loads(text, parse_constant=None if allow_nan else no_constants)
    except json.JSONDecodeError as exc:
        raise ValidationError("$", f"{what} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except ValueError as exc:
        raise ValidationError("$", f"{what}: {exc}") from None
