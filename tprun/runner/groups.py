"""Independent groups (`--groups independent`): each TP group is a world of its own, and the groups share
nothing but OUT. The group's leader claims chunks by lease file (leases.py) instead of from the store,
publishes each part so that exactly one copy of a chunk counts (parts.publish_part), and whichever group
finds every chunk done merges, exactly once, under the lease "merge".

The rest of the job (plan, rendezvous of the group's own tp ranks, engine, `job._work`) is the one-world
runner's. `job._work` stops claiming when nothing is claimable *now*; while other groups still hold live
leases, `work_until_done` waits, and resumes work when a lease goes stale (its group died or stalled) or
finds every chunk done. Every decision is the leader's and is broadcast in the TP group, so all ranks of
a group leave and enter collectives together.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from tprun.runner import parts
from tprun.runner.chunks import any_in_group, from_leader
from tprun.runner.exit_codes import EXIT_OK, EXIT_REQUEUE
from tprun.runner.leases import Lease, LeaseDir, Renewer
from tprun.runner.signals import StopFlag

_NO_MORE, _STOP = -1, -2  # as chunks.py: a chunk index or one of these
_WAIT, _MORE, _DONE = 0, 1, 2
MERGE = "merge"
POLL_S = float(os.environ.get("TPRUN_LEASE_POLL_S", "0.5"))


def group_index() -> int:
    """This group's number, for logs, lease files and the summary (never for correctness): the launcher's,
    where it has one (Slurm array task, the LWS group label the render passes on), else --group-index."""
    for var in ("TPRUN_GROUP_INDEX", "SLURM_ARRAY_TASK_ID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def chunk_name(k: int) -> str:
    return f"chunk-{k:06d}"


class LeaseClaimer:
    """ChunkClaimer's interface (next, stopped, write) over lease files; the leader touches the files."""

    def __init__(self, out: Any, *, num_chunks: int, tp_rank: int, tp_size: int,
                 tp_group: dist.ProcessGroup | None, stop: StopFlag, timeout_s: float, log: Callable[[str], None],
                 group: int | None = None) -> None:
        self.out = out
        self.num_chunks = num_chunks
        self.is_leader = tp_rank == 0
        self.tp_size, self.tp_group, self.stop, self.log = tp_size, tp_group, stop, log
        self.group = group_index() if group is None else group
        self.stopped: str | None = None
        self.leases = LeaseDir(out, self.group, timeout_s) if self.is_leader else None
        self.renewer = Renewer(self.leases).start() if self.leases is not None else None
        self.held: dict[int, Lease] = {}
        self._fresh = deque(range(num_chunks))  # not yet looked at, in input order
        self._waiting: list[int] = []  # held by another group when last looked at
        self._swept = time.monotonic()
        self.redone = 0  # chunks this group took over from a group that stopped renewing

    # -- group collectives: every rank calls these at the same moments and gets the same answer

    def next(self) -> int | None:
        """The next chunk this group may run now, or None: nothing claimable now, or stopping."""
        stop = self._any_in_group(self.stop.requested)
        k = (_STOP if stop else self._claim_now()) if self.is_leader else 0
        k = self._from_leader(k)
        if k == _STOP:
            self._set_stopped(stop)
        return None if k < 0 else k

    def wait_for_work(self) -> bool:
        """After a round of work: True once a chunk is claimable again, False when all are done or on stop."""
        while True:
            stop = self._any_in_group(self.stop.requested)
            verdict = (_STOP if stop else self._survey()) if self.is_leader else 0
            verdict = self._from_leader(verdict)
            if verdict == _STOP:
                self._set_stopped(stop)
                return False
            if verdict != _WAIT:
                return verdict == _MORE
            time.sleep(POLL_S)

    # -- the leader's side

    def write(self, out: Any, k: int, records: list[dict[str, Any]], stats: dict[str, Any]) -> bool:
        """Publish chunk k (leader only); False if another group's copy counts instead."""
        lease = self.held.pop(k)
        published = parts.publish_part(out, k, lease.nonce, records, {**stats, "group": self.group},
                                       still_ours=lambda: self.leases.holds(lease))
        self.renewer.drop(lease.name)
        if not published:
            self._waiting.append(k)  # the group that took it over may die too: then it is ours to redo
            self.log(f"chunk {k} was taken over by another group while this one was slow (lease not renewed "
                     f"for {self.leases.timeout_s:g} s); this group's copy is discarded")
        return published

    def _claim_now(self) -> int:
        """Stale leases of other groups first (checked every timeout/2: a dead group's chunks are redone
        soon, not after all fresh ones), then the next fresh chunk in input order."""
        if time.monotonic() - self._swept >= self.leases.timeout_s / 2 or not self._fresh:
            k = self._sweep()
            if k is not None:
                return k
        while self._fresh:
            k = self._fresh.popleft()
            if parts.is_done(self.out, k):
                continue
            if self._take(k):
                return k
            self._waiting.append(k)  # another group holds it: look again at the next sweep
        return _NO_MORE

    def _sweep(self) -> int | None:
        self._swept = time.monotonic()
        self._waiting = [k for k in self._waiting if not parts.is_done(self.out, k)]
        now = self.leases.now()
        for k in self._waiting:
            if self.leases.state(chunk_name(k), now) != "live" and self._take(k):
                self._waiting.remove(k)
                return k
        return None

    def _take(self, k: int) -> bool:
        lease = self.leases.try_claim(chunk_name(k))
        if lease is None:
            return False
        self.held[k] = lease
        self.renewer.add(lease)
        if lease.generation > 0:  # another group claimed it before and stopped renewing
            self.redone += 1
            self.log(f"taking over chunk {k}: its lease was not renewed for {self.leases.timeout_s:g} s")
        return True

    def _survey(self) -> int:
        """Between rounds of work, with nothing in flight: done, more to claim, or wait for other groups."""
        self._waiting = [k for k in self._waiting if not parts.is_done(self.out, k)]
        if self._fresh:
            return _MORE
        if not self._waiting:
            return _DONE
        now = self.leases.now()
        return _MORE if any(self.leases.state(chunk_name(k), now) != "live" for k in self._waiting) else _WAIT

    def close(self) -> None:
        if self.renewer is not None:
            self.renewer.stop()
            self.leases.close()

    def _set_stopped(self, stop: bool) -> None:
        self.stopped = (self.stop.signal_name if self.stop.requested
                        else "a stop signal on another rank of this TP group" if stop else "stopped")

    def _any_in_group(self, flag: bool) -> bool:
        return any_in_group(flag, self.tp_size, self.tp_group)

    def _from_leader(self, k: int) -> int:
        return from_leader(k, self.tp_size, self.tp_group)


def work_until_done(plan: Any, llm: Any, claimer: LeaseClaimer, work: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """Rounds of `job._work` until every chunk is done (by any group) or a stop; this group's stats."""
    total: dict[str, Any] | None = None
    while True:
        stats = work(plan, llm, claimer)
        if total is None:
            total = stats
        else:
            for key, value in stats.items():  # counters and seconds add up over the rounds
                if key != "group" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    total[key] += value
        total["stopped"] = claimer.stopped
        if claimer.stopped or not claimer.wait_for_work():
            total["stopped"] = claimer.stopped
            total["group"] = claimer.group
            return total


def finish_group(plan: Any, claimer: LeaseClaimer, elapsed: float) -> int:
    """The group leader, once every chunk is done or the group stops: merge under the merge lease, or wait
    for the group that merges (taking over if its lease goes stale)."""
    from tprun.runner.progress import format_summary
    from tprun.runner.records import record_format

    out, n = plan.out, plan.index.num_chunks
    try:
        while True:
            if (out / parts.SUCCESS).exists():
                return EXIT_OK
            missing = [k for k in range(n) if not parts.is_done(out, k)]
            if missing:
                plan.log(f"stopped ({claimer.stopped}) with {len(missing)} of {n} chunks left (other groups may "
                         f"finish them); exiting with {EXIT_REQUEUE}; rerun this group to rejoin")
                return EXIT_REQUEUE
            lease = claimer.leases.try_claim(MERGE)
            if lease is not None:
                claimer.renewer.add(lease)
                merged = parts.merge(out, n, plan.index.errors, record_format(plan))
                summary = {"records": merged.records, "errors": merged.errors,
                           "prompt_tokens": merged.prompt_tokens, "output_tokens": merged.output_tokens,
                           "seconds": round(elapsed, 3), "tokens_per_s": None,
                           "groups": _groups(out, n, claimer.tp_size),
                           "results": str(out / parts.RESULTS), "merged_by_group": claimer.group}
                parts.write_success(out, summary)
                print(format_summary(summary), file=sys.stderr, flush=True)
                return EXIT_OK
            if claimer.stop.requested:
                return EXIT_REQUEUE
            time.sleep(POLL_S)
    finally:
        claimer.close()


def _groups(out: Any, n: int, tp: int) -> list[dict[str, Any]]:
    """Per group, from the done markers (the only record of who ran what that every group can read)."""
    by_group: dict[int, dict[str, Any]] = {}
    for k in range(n):
        done = parts.read_done(out, k)
        g = by_group.setdefault(int(done.get("group", 0)), {"group": int(done.get("group", 0)), "ranks": list(range(tp)),
                                                           "chunks": 0, "records": 0, "tokens": 0})
        g["chunks"] += 1
        g["records"] += int(done.get("records", 0))
        g["tokens"] += int(done.get("tokens", 0))
    return [by_group[g] for g in sorted(by_group)]
