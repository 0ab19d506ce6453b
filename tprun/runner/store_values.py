"""Reading values from the job's store strictly: the store is a TCP port, so anything may sit under a key.

Every value is parsed into the shape this runner wrote (bounded size, UTF-8 text, an integer in range,
a JSON object with exactly the expected fields); anything else is a StoreValueError naming the key.
Nothing read from the store is ever unpickled or evaluated.
"""

from __future__ import annotations

import json
from typing import Any

MAX_TEXT_BYTES = 4096
MAX_JSON_BYTES = 64 * 1024


class StoreValueError(RuntimeError):
    """A value in the job's store is not what a tprun rank writes there."""


def _malformed(key: str, why: str) -> StoreValueError:
    return StoreValueError(
        f"malformed value under store key {key!r}: {why}; another process wrote into this job's store "
        "(is MASTER_PORT shared with another job, or is the port reachable by others?)"
    )


def check_text(key: str, raw: bytes, max_bytes: int = MAX_TEXT_BYTES) -> str:
    if len(raw) > max_bytes:
        raise _malformed(key, f"{len(raw)} bytes, at most {max_bytes} expected")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _malformed(key, "not UTF-8 text") from None
    if any(c < " " and c not in "\n\t" or c == "\x7f" for c in text):
        raise _malformed(key, "control characters in the text")
    return text


def printable(text: str, max_bytes: int = MAX_TEXT_BYTES - 96) -> str:
    """`text` cut and cleaned so that check_text accepts it (a reason may quote arbitrary input)."""
    text = "".join(c if c >= " " and c != "\x7f" or c in "\n\t" else "?" for c in text)
    raw = text.encode()
    return text if len(raw) <= max_bytes else raw[:max_bytes].decode("utf-8", "ignore") + " ..."


def get_text(store: Any, key: str, max_bytes: int = MAX_TEXT_BYTES) -> str:
    return check_text(key, store.get(key), max_bytes)


def get_int(store: Any, key: str, allowed: range | frozenset[int]) -> int:
    text = get_text(store, key, 32)
    if not text.lstrip("-").isdigit() or int(text) not in allowed:
        raise _malformed(key, f"{text[:32]!r} is not one of the expected integers")
    return int(text)


def check_json(key: str, raw: bytes, fields: dict[str, type | tuple[type, ...]],
               max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """A JSON object with exactly `fields` (name -> accepted types; bool is never taken for int)."""
    text = check_text(key, raw, max_bytes)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise _malformed(key, f"not JSON ({e.msg})") from None
    if not isinstance(value, dict) or set(value) != set(fields):
        raise _malformed(key, f"expected a JSON object with the fields {sorted(fields)}")
    for name, types in fields.items():
        v = value[name]
        ok = isinstance(v, types) and not (isinstance(v, bool) and bool not in _as_tuple(types))
        if not ok:
            raise _malformed(key, f"field {name!r} has type {type(v).__name__}")
    return value


def get_json(store: Any, key: str, fields: dict[str, type | tuple[type, ...]],
             max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    return check_json(key, store.get(key), fields, max_bytes)


def int_list(key: str, value: Any, lo: int, hi: int) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(x, int) and not isinstance(x, bool) and lo <= x < hi
                                              for x in value):
        raise _malformed(key, f"expected a list of integers in [{lo}, {hi})")
    return value


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)
