"""Rank 0's view of the whole job, read from the counters every group leader bumps in the store.

A tqdm bar (records done / total, tok/s, ETA) for terminals; in quiet mode, a plain line every
`interval_s` seconds, which reads well in a log file.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tprun.runner import keys

if TYPE_CHECKING:
    import torch.distributed as dist


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


@dataclass
class Snapshot:
    records: int  # done in this run
    tokens: int  # generated in this run
    elapsed: float


class Progress:
    def __init__(self, store: dist.Store, *, total: int, already_done: int, quiet: bool,
                 interval_s: float = 30.0, refresh_s: float = 1.0) -> None:
        self.store = store.clone() if hasattr(store, "clone") else store
        self.total, self.already_done = total, already_done
        self.quiet, self.interval_s, self.refresh_s = quiet, interval_s, refresh_s
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar: Any = None

    def start(self) -> Progress:
        if not self.quiet:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, initial=self.already_done, unit="rec", dynamic_ncols=True,
                             desc="tprun", file=sys.stderr)
        self._thread = threading.Thread(target=self._loop, name="tprun-progress", daemon=True)
        self._thread.start()
        return self

    def snapshot(self) -> Snapshot:
        return Snapshot(self.store.add(keys.RECORDS_DONE, 0), self.store.add(keys.TOKENS_DONE, 0),
                        time.monotonic() - self._t0)

    def line(self, snap: Snapshot) -> str:
        done = self.already_done + snap.records
        rate = snap.tokens / snap.elapsed if snap.elapsed > 0 else 0.0
        per_record = snap.elapsed / snap.records if snap.records else None
        eta = _duration(per_record * (self.total - done)) if per_record is not None else "?"
        pct = 100.0 * done / self.total if self.total else 100.0
        return f"tprun: {done}/{self.total} records ({pct:.0f}%), {rate:.1f} tok/s, ETA {eta}"

    def _loop(self) -> None:
        last_line = time.monotonic()
        while not self._stop.wait(self.refresh_s):
            try:
                snap = self.snapshot()
            except (RuntimeError, OSError):  # the watchdog reports a lost store; the bar just stops
                return
            if self._bar is not None:
                self._bar.n = self.already_done + snap.records
                self._bar.set_postfix_str(f"{snap.tokens / max(snap.elapsed, 1e-9):.1f} tok/s", refresh=True)
            elif time.monotonic() - last_line >= self.interval_s:
                print(self.line(snap), file=sys.stderr, flush=True)
                last_line = time.monotonic()

    def close(self) -> None:
        """Idempotent: the job closes the bar before its summary and again on the way out."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._bar is not None:
            with contextlib.suppress(RuntimeError, OSError):
                self._bar.n = self.already_done + self.store.add(keys.RECORDS_DONE, 0)
            self._bar.close()
            self._bar = None


def format_summary(summary: dict[str, Any]) -> str:
    rate = summary.get("tokens_per_s")
    lines = [f"tprun: done: {summary['records']} records, {summary['errors']} error(s), "
             f"{summary['output_tokens']} tokens generated in {summary['seconds']:.1f} s"
             + (f" ({rate:.1f} tok/s)" if rate else "")]
    for g in summary.get("groups", []):
        ranks = g["ranks"]
        span = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
        g_rate = g.get("tokens_per_s")
        lines.append(f"  group {g['group']} ({span}): {g['records']} records in {g['chunks']} chunk(s), "
                     f"{g['tokens']} tokens" + (f", {g_rate:.1f} tok/s" if g_rate else ""))
    lines.append(f"  results: {summary['results']}")
    return "\n".join(lines)
