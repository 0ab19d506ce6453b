"""Slurm's compressed host and count lists, expanded in pure Python (no `scontrol show hostnames`).

Host lists: comma-separated items; each item is text with any number of bracket groups, and a group holds
comma-separated numbers and ranges. The width of a range's low end is kept as zero padding, and several
groups expand as a product, leftmost slowest, as Slurm does:
    gpu-[007-009,012]       -> gpu-007 gpu-008 gpu-009 gpu-012
    a1,b[2-3]               -> a1 b2 b3
    rack[1-2]-n[01-02]      -> rack1-n01 rack1-n02 rack2-n01 rack2-n02
Count lists (SLURM_TASKS_PER_NODE): `2(x3),1` -> 2 2 2 1.
"""

from __future__ import annotations

import itertools
import re

from tprun.launchers.base import LauncherError

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
_COUNT = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


def expand_hostlist(expr: str) -> list[str]:
    """All host names of a Slurm host list expression, in order; LauncherError if it is malformed."""
    hosts: list[str] = []
    for item in _split_top_level(expr):
        hosts.extend(_expand_item(item, expr))
    if not hosts:
        raise LauncherError(f"host list {expr!r} names no host")
    return hosts


def first_host(expr: str) -> str:
    return expand_hostlist(expr)[0]


def expand_counts(expr: str) -> list[int]:
    """`2(x3),1` -> [2, 2, 2, 1] (SLURM_TASKS_PER_NODE, SLURM_JOB_CPUS_PER_NODE)."""
    counts: list[int] = []
    for part in expr.split(","):
        m = _COUNT.match(part.strip())
        if not m:
            raise LauncherError(f"count list {expr!r}: {part!r} is not N or N(xM)")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


def _split_top_level(expr: str) -> list[str]:
    """Split at commas outside brackets: `a[1,2],b` -> `a[1,2]`, `b`."""
    items, depth, start = [], 0, 0
    for i, c in enumerate(expr):
        if c == "[":
            depth += 1
            if depth > 1:
                raise LauncherError(f"host list {expr!r}: nested '[' at position {i}")
        elif c == "]":
            depth -= 1
            if depth < 0:
                raise LauncherError(f"host list {expr!r}: ']' without '[' at position {i}")
        elif c == "," and depth == 0:
            items.append(expr[start:i])
            start = i + 1
    if depth:
        raise LauncherError(f"host list {expr!r}: '[' is never closed")
    items.append(expr[start:])
    return [item.strip() for item in items if item.strip()]


def _expand_item(item: str, expr: str) -> list[str]:
    # re.split with a capture group alternates text, group, text, group, ..., text.
    parts = re.split(r"\[([^\]]*)\]", item)
    choices = [[p] if i % 2 == 0 else _expand_group(p, expr) for i, p in enumerate(parts)]
    return ["".join(combo) for combo in itertools.product(*choices)]


def _expand_group(group: str, expr: str) -> list[str]:
    out: list[str] = []
    for rng in group.split(","):
        m = _RANGE.match(rng.strip())
        if not m:
            raise LauncherError(f"host list {expr!r}: [{group}] holds {rng!r}, not a number or range N-M")
        lo, hi = m.group(1), m.group(2)
        if hi is None:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise LauncherError(f"host list {expr!r}: range {rng!r} runs backwards")
        out.extend(f"{n:0{len(lo)}d}" for n in range(int(lo), int(hi) + 1))
    return out
