"""No hang: when a rank dies, every other rank exits non-zero within a minute, naming the lost rank.

A rank's TP peers notice its death in their next collective (gloo fails fast when a socket closes),
but other TP groups never talk to it. So every rank bumps a heartbeat counter in the job's store and
watches the next rank's counter (a ring: O(world) store traffic, every rank watched by someone). A rank
whose counter stops for `timeout_s` is declared lost: the watcher writes the reason under ABORT, which
every rank polls, and exits. A failing rank writes ABORT itself before it exits.

The store lives in rank 0's process (or torchrun's agent). If it stops answering, store calls would
block for the store's own timeout, so a second thread, which never touches the network, exits the rank
when the heartbeat thread has not completed a round trip for `timeout_s`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

from tprun.runner import keys
from tprun.runner.store_values import StoreValueError, get_text, printable

if TYPE_CHECKING:
    import torch.distributed as dist
from tprun.runner.exit_codes import EXIT_PEER_FAILED

# What a store call raises when the store is gone or times out (DistStoreError is a RuntimeError).
_STORE_ERRORS = (RuntimeError, OSError)


def _host_key(rank: int) -> str:
    return f"{keys.PREFIX}host/{rank}"


class Watchdog:
    def __init__(self, store: dist.Store, rank: int, world_size: int, *, period_s: float = 2.0,
                 timeout_s: float = 30.0, log: Callable[[str], None] | None = None,
                 exit: Callable[[int], NoReturn] = os._exit) -> None:
        # Its own connection: the main thread's store calls must never delay a heartbeat, nor the reverse.
        self.store = store.clone() if hasattr(store, "clone") else store
        self.rank, self.world_size = rank, world_size
        self.period_s, self.timeout_s = period_s, timeout_s
        self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._exit = exit
        self._stop = threading.Event()
        self._last_ok = time.monotonic()
        self._threads: list[threading.Thread] = []
        self._dying = threading.Lock()
        self._published = False  # this rank wrote ABORT: its main thread is already on the way out

    def start(self) -> Watchdog:
        self.store.set(_host_key(self.rank), f"{socket.gethostname()} pid {os.getpid()}")
        self.store.add(keys.heartbeat(self.rank), 1)
        for target, name in ((self._beat, "tprun-heartbeat"), (self._guard, "tprun-watchdog")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        """No store calls after this returns (rank 0 may take the store down next)."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.period_s + self.timeout_s)
        self._threads.clear()

    def describe(self, rank: int) -> str:
        # Naming the rank's host is best effort: the store may be the thing that is gone.
        with contextlib.suppress(*_STORE_ERRORS):
            if self.store.check([_host_key(rank)]):
                return f"rank {rank} ({get_text(self.store, _host_key(rank), 512)})"
        return f"rank {rank}"

    def abort(self, reason: str) -> None:
        """Tell every rank to stop, first writer wins (best effort: the store may be gone)."""
        self._published = True
        with contextlib.suppress(*_STORE_ERRORS):
            self.store.compare_set(keys.ABORT, "", printable(reason))

    def aborted(self) -> str | None:
        with contextlib.suppress(*_STORE_ERRORS):
            return self._read_abort()
        return None

    @property
    def linger_s(self) -> float:
        """Long enough for every other rank's heartbeat thread to come round and read ABORT."""
        return 2 * self.period_s + 0.5

    def find_lost(self, ranks: list[int], wait_s: float | None = None) -> list[int] | None:
        """Of `ranks`, those whose heartbeat does not move within `wait_s`, to name the peer behind a failed
        collective; None when the store itself is unreachable (then rank 0 is the one gone)."""
        wait_s = 2.5 * self.period_s if wait_s is None else wait_s
        try:
            before = {r: self.store.add(keys.heartbeat(r), 0) for r in ranks}
            time.sleep(wait_s)
            return [r for r in ranks if self.store.add(keys.heartbeat(r), 0) == before[r]]
        except _STORE_ERRORS:
            return None

    # -- threads ---------------------------------------------------------------------------------------

    def _beat(self) -> None:
        watched = (self.rank + 1) % self.world_size
        seen, seen_at = -1, time.monotonic()
        while not self._stop.is_set():
            try:
                self.store.add(keys.heartbeat(self.rank), 1)
                reason = self._read_abort()
                if reason is not None and not self._published:
                    self._die(f"stopping because {reason}", publish=False)
                if watched != self.rank and not self.store.check([keys.FINAL]):
                    count = self.store.add(keys.heartbeat(watched), 0)
                    now = time.monotonic()
                    if count != seen:
                        seen, seen_at = count, now
                    elif now - seen_at > self.timeout_s:
                        self._die(f"{self.describe(watched)} stopped heartbeating {now - seen_at:.0f} s ago "
                                  f"(seen by rank {self.rank}); it died or hangs")
            except StoreValueError as e:
                self._die(str(e))
            except _STORE_ERRORS as e:
                if self._stop.is_set():
                    return
                self._die(f"rank {self.rank} lost the job's store (hosted by rank 0 or the launcher's "
                          f"agent): {e}; rank 0 probably died", publish=False)
            self._last_ok = time.monotonic()
            self._stop.wait(self.period_s)

    def _read_abort(self) -> str | None:
        if self.store.check([keys.ABORT]):
            return get_text(self.store, keys.ABORT)
        return None

    def _guard(self) -> None:
        while not self._stop.wait(self.period_s / 2):
            silent = time.monotonic() - self._last_ok
            if silent > self.timeout_s + self.period_s:
                self._die(f"rank {self.rank}: the job's store (hosted by rank 0 or the launcher's agent) has "
                          f"not answered for {silent:.0f} s; rank 0 or its node is probably gone",
                          publish=False)

    def _die(self, reason: str, *, publish: bool = True) -> NoReturn:
        with self._dying:
            self._log(f"tprun: rank {self.rank}: {reason}; exiting with {EXIT_PEER_FAILED}")
            if publish:
                self.abort(reason)
            if self.rank == 0:
                # Rank 0 hosts the store: linger so the others read the reason, not a broken socket.
                time.sleep(self.linger_s)
            sys.stdout.flush()
            sys.stderr.flush()
            self._exit(EXIT_PEER_FAILED)
