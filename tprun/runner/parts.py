"""Finished chunks on disk, and the merge that turns them into results.jsonl.

A chunk is done exactly when its done marker exists. The part file is renamed into place (after an
fsync) before the marker is, so a reader that sees the marker sees every record of the chunk, and a
process killed at any moment leaves either nothing visible for that chunk or all of it.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tprun.runner.inputs import LineError
from tprun.runner.leases import LEASES, create_exclusive
from tprun.runner.records import TPRUN, RecordFormat

PARTS = "parts"
RESULTS = "results.jsonl"
ERRORS = "errors.jsonl"
SUMMARY = "summary.json"
SUCCESS = "_SUCCESS"
# Every tprun record has these; logprobs, prompt_logprobs and outputs (n > 1) when asked (records.py).
RESULT_FIELDS = ("id", "output_text", "output_token_ids", "finish_reason", "stop_reason", "num_prompt_tokens")


def atomic_write(path: Path, data: bytes) -> None:
    """Write, fsync, rename, fsync the directory: the file appears whole or not at all."""
    # Host and pid: writers on different hosts (containers all have small pids) never share a temp file.
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def part_path(out: Path, k: int) -> Path:
    return out / PARTS / f"chunk-{k:06d}.jsonl"


def done_path(out: Path, k: int) -> Path:
    return out / PARTS / f"chunk-{k:06d}.done"


def is_done(out: Path, k: int) -> bool:
    return done_path(out, k).exists()


def read_done(out: Path, k: int) -> dict[str, Any]:
    return json.loads(done_path(out, k).read_text())


def write_part(out: Path, k: int, records: Iterable[dict[str, Any]], stats: dict[str, Any]) -> None:
    """Records carry "line" (0-based input line) besides the result fields; the merge drops it."""
    (out / PARTS).mkdir(parents=True, exist_ok=True)
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write(part_path(out, k), body.encode())
    atomic_write(done_path(out, k), json.dumps(stats).encode())


def publish_part(out: Path, k: int, tag: str, records: Iterable[dict[str, Any]], stats: dict[str, Any],
                 still_ours: Callable[[], bool] = lambda: True) -> bool:
    """For writers that do not coordinate (independent groups): True if this part is the one that counts.

    The part gets a name of its own (`tag`: the writer's lease nonce), and the done marker, which names
    it, is created exclusively: of two writers of chunk k (one whose lease was taken over while it was
    slow, and the one that took over) exactly one publishes, and the merge reads only the part its marker
    names. A writer that has lost its lease does not even try.
    """
    (out / PARTS).mkdir(parents=True, exist_ok=True)
    name = f"chunk-{k:06d}.{tag}.jsonl"
    atomic_write(out / PARTS / name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())
    if is_done(out, k) or not still_ours():
        (out / PARTS / name).unlink(missing_ok=True)
        return False
    if create_exclusive(done_path(out, k), json.dumps({**stats, "part": name}).encode()):
        _fsync_dir(out / PARTS)
        return True
    (out / PARTS / name).unlink(missing_ok=True)
    return False


def published_part(out: Path, k: int) -> Path:
    """The part file chunk k's done marker vouches for."""
    name = read_done(out, k).get("part")
    return out / PARTS / name if name else part_path(out, k)


def remove_stale_temporaries(out: Path, min_age_s: float = 0.0) -> None:
    """Temp files of writers killed mid-write; never visible as parts, but they take space. With
    independent groups another group may be writing right now: only files older than `min_age_s` go."""
    import time

    for d in (out, out / PARTS):
        if d.is_dir():
            for p in d.glob(".*.tmp-*"):
                try:
                    if min_age_s and time.time() - p.stat().st_mtime < min_age_s:
                        continue
                except FileNotFoundError:
                    continue
                p.unlink(missing_ok=True)


@dataclass
class MergeStats:
    records: int = 0
    errors: int = 0  # lines skipped by validation plus records the engine failed
    prompt_tokens: int = 0
    output_tokens: int = 0  # over all n samples of each record


def merge(out: Path, num_chunks: int, line_errors: list[LineError], fmt: RecordFormat = TPRUN) -> MergeStats:
    """Concatenate the parts in chunk order (= input order) into results.jsonl; write errors.jsonl.

    errors.jsonl holds the lines that never ran (validation) and the records the engine answered with
    finish_reason "error" (e.g. a prompt longer than the model allows), ordered by line, in `fmt`'s form.
    """
    missing = [k for k in range(num_chunks) if not is_done(out, k)]
    if missing:
        raise RuntimeError(f"cannot merge: {len(missing)} chunk(s) not done (first: {missing[:5]})")
    stats = MergeStats()
    errors = [(e.line, fmt.line_error(e)) for e in line_errors]
    tmp = out / f".{RESULTS}.tmp-{socket.gethostname()}-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as dst:
        for k in range(num_chunks):
            with open(published_part(out, k), encoding="utf-8") as src:
                for raw in src:
                    rec = json.loads(raw)
                    line = rec.pop("line")
                    failure = fmt.failure(rec, line)
                    if failure is not None:
                        errors.append((line, failure))
                        if not fmt.keep_failed:
                            continue
                    dst.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    stats.records += 1
                    prompt_tokens, output_tokens = fmt.usage(rec)
                    stats.prompt_tokens += prompt_tokens
                    stats.output_tokens += output_tokens
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, out / RESULTS)
    errors.sort(key=lambda e: e[0])
    stats.errors = len(errors)
    write_errors(out, [e for _, e in errors])
    return stats


def write_errors(out: Path, errors: list[dict[str, Any]]) -> None:
    atomic_write(out / ERRORS, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in errors).encode())


def write_success(out: Path, summary: dict[str, Any]) -> None:
    atomic_write(out / SUMMARY, (json.dumps(summary, indent=2) + "\n").encode())
    atomic_write(out / SUCCESS, b"")


def clear_outputs(out: Path) -> None:
    """What --overwrite removes: only files this runner writes, never anything else in the directory."""
    import shutil

    for name in (SUCCESS, SUMMARY, RESULTS, ERRORS, "manifest.json"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / PARTS, ignore_errors=True)
    shutil.rmtree(out / LEASES, ignore_errors=True)
