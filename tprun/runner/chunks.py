"""Dynamic work distribution: TP-group leaders claim chunks from a counter in the job's store.

A faster group simply comes back for more. The leader claims and broadcasts the chunk inside its TP
group, because every rank of a group must run the same prompts. At each boundary the group first agrees
on stopping (all_reduce MAX of the ranks' stop flags: a signal may reach only some ranks), so all ranks
of a group leave the loop together and none is left waiting in a collective.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from tprun.runner import keys, parts
from tprun.runner.signals import StopFlag

_NO_MORE, _STOP = -1, -2


class ChunkClaimer:
    def __init__(self, store: dist.Store, *, num_chunks: int, is_done: Callable[[int], bool], tp_rank: int,
                 tp_size: int, tp_group: dist.ProcessGroup | None, stop: StopFlag) -> None:
        self.store = store
        self.num_chunks = num_chunks
        self.is_done = is_done
        self.is_leader = tp_rank == 0
        self.tp_size = tp_size
        self.tp_group = tp_group
        self.stop = stop
        self.stopped: str | None = None  # why this group stopped early, if it did

    def next(self) -> int | None:
        """Every rank of the TP group calls this at every chunk boundary; all get the same answer."""
        stop = self._any_in_group(self.stop.requested)
        if self.is_leader:
            if stop:
                self.store.set(keys.STOP, self.stop.signal_name or "a stop signal on another rank of this TP group")
            if stop or self.store.check([keys.STOP]):
                k = _STOP
            else:
                k = self._claim()
        else:
            k = 0
        k = self._from_leader(k)
        if k == _STOP:
            self.stopped = (self.stop.signal_name if self.stop.requested
                            else "a stop signal on another rank of this TP group" if stop
                            else "stop requested by another group")
        return None if k < 0 else k

    def write(self, out: Any, k: int, records: list[dict[str, Any]], stats: dict[str, Any]) -> bool:
        """Leader only: chunk k's part; each chunk is handed out once per run, so it always counts."""
        parts.write_part(out, k, records, stats)
        return True

    def _claim(self) -> int:
        """Next chunk not finished by an earlier run; each index is handed out once per run."""
        while True:
            k = self.store.add(keys.NEXT_CHUNK, 1) - 1
            if k >= self.num_chunks:
                return _NO_MORE
            if not self.is_done(k):
                return k

    def _any_in_group(self, flag: bool) -> bool:
        return any_in_group(flag, self.tp_size, self.tp_group)

    def _from_leader(self, k: int) -> int:
        return from_leader(k, self.tp_size, self.tp_group)


def any_in_group(flag: bool, tp_size: int, tp_group) -> bool:
    """Whether any rank of the TP group raised the flag (a group collective)."""
    if tp_size == 1:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=tp_group)
    return bool(t.item())


def from_leader(k: int, tp_size: int, tp_group) -> int:
    """The TP leader's value of k, on every rank of the group (a group collective)."""
    if tp_size == 1:
        return k
    t = torch.tensor([k], dtype=torch.int64)
    dist.broadcast(t, group=tp_group, group_src=0)
    return int(t.item())
