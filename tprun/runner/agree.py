"""Ranks agree on the job before the first step: same input, model files and spec, and rank 0's OUT.

Only tensors cross the wire (no all_gather_object: it unpickles what a peer sends). First one fixed-size
digest of the whole job per rank; only if they differ, each rank's table of per-component digests (JSON
in a length-checked uint8 tensor, parsed strictly), so every rank can name the file that differs.
Collectives, so every rank reaches the same verdict and none waits for another.
"""

from __future__ import annotations

import hashlib
import json
import socket
from typing import Any

import torch
import torch.distributed as dist

from tprun.runner import manifest, parts
from tprun.runner.preflight import JobError

_DIGEST_BYTES = 32
_MAX_TABLE_BYTES = 1 << 20
_MAX_TEXT_BYTES = 4096


def agree_on_job(plan: Any, ctx: Any) -> None:
    """Nothing is written into OUT before this point: every rank's local checks read the same OUT."""
    group, world = ctx.world_cpu_group, ctx.world_size
    hosts = [b.decode("utf-8", "replace") for b in
             gather_bytes(socket.gethostname().encode()[:255], group, world, 255, "host names")]
    table = manifest.components(plan.identity)
    mine = hashlib.blake2b(json.dumps(table, sort_keys=True).encode(), digest_size=_DIGEST_BYTES).digest()
    digests = gather_bytes(mine, group, world, _DIGEST_BYTES, "job digests", fixed=True)
    if any(d != digests[0] for d in digests):
        tables = [_parse_table(raw, r) for r, raw in enumerate(
            gather_bytes(json.dumps(table, sort_keys=True).encode(), group, world, _MAX_TABLE_BYTES,
                         "job component digests"))]
        raise JobError(_describe_mismatch(tables, hosts))

    problem = ""
    if ctx.rank == 0:
        try:
            manifest.prepare(plan.out, plan.identity, plan.state)
            # Independent groups: another group may be writing now; only what no live writer can own goes.
            parts.remove_stale_temporaries(plan.out, min_age_s=plan.spec.lease_timeout_s
                                           if plan.spec.parallel.groups == "independent" else 0.0)
        except OSError as e:
            problem = f"rank 0 cannot set up {plan.out}: {e}"
    # Also the barrier behind rank 0's writes.
    problem = gather_bytes(problem.encode()[:_MAX_TEXT_BYTES], group, world, _MAX_TEXT_BYTES, "set-up")[0]
    if problem:
        raise JobError(problem.decode("utf-8", "replace"))
    seen = gather_bytes(b"\1" if manifest.load(plan.out) is not None else b"\0", group, world, 1, "manifest",
                        fixed=True)
    blind = [r for r, sees in enumerate(seen) if sees != b"\1"]
    if blind:
        raise JobError(
            f"rank(s) {blind} (on {sorted({hosts[r] for r in blind})}) do not see the manifest rank 0 wrote "
            f"into {plan.out} on {hosts[0]}; --output must be a directory shared by all nodes"
        )


def gather_bytes(data: bytes, group: Any, world: int, max_len: int, what: str,
                 fixed: bool = False) -> list[bytes]:
    """Every rank's `data` (at most `max_len` bytes; exactly that with `fixed`), through two all_gathers:
    lengths, then the bytes padded to the longest. A rank with too much data sends length -1, so every rank
    raises the same error instead of one leaving the collective early."""
    bad = len(data) > max_len or (fixed and len(data) != max_len)
    n = torch.tensor([-1 if bad else len(data)], dtype=torch.int64)
    lens_t = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(lens_t, n, group=group)
    lens = [int(t) for t in lens_t]
    odd = [r for r, size in enumerate(lens) if size < 0 or size > max_len or (fixed and size != max_len)]
    if odd:
        raise RuntimeError(f"rank(s) {odd} sent malformed {what} (sizes {[lens[r] for r in odd]}, at most "
                           f"{max_len} bytes expected)")
    width = max(max(lens), 1)
    buf = torch.zeros(width, dtype=torch.uint8)
    if data:
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    bufs = [torch.zeros_like(buf) for _ in range(world)]
    dist.all_gather(bufs, buf, group=group)
    return [bytes(b[:size].numpy().tobytes()) for b, size in zip(bufs, lens)]


def _parse_table(raw: bytes, rank: int) -> dict[str, str]:
    try:
        table = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        table = None
    if not isinstance(table, dict) or not all(
            isinstance(k, str) and len(k) <= 1024 and isinstance(v, str) and len(v) <= 128
            for k, v in table.items()):
        raise RuntimeError(f"rank {rank} sent a malformed table of job component digests")
    return table


def _describe_mismatch(tables: list[dict[str, str]], hosts: list[str]) -> str:
    odd = [r for r in range(len(tables)) if tables[r] != tables[0]]
    lines = []
    for r in odd:
        names = sorted(set(tables[r]) | set(tables[0]))
        diffs = []
        for name in names:
            if name not in tables[r]:
                diffs.append(f"{name} (missing on rank {r})")
            elif name not in tables[0]:
                diffs.append(f"{name} (missing on rank 0)")
            elif tables[r][name] != tables[0][name]:
                diffs.append(name)
        lines.append(f"rank {r} ({hosts[r]}): {', '.join(diffs)}")
    return (f"rank(s) {odd} (on {sorted({hosts[r] for r in odd})}) read a different input, model or spec than "
            f"rank 0 (on {hosts[0]}); differing: {'; '.join(lines)}; every rank needs the same files, e.g. on a "
            "shared filesystem")
