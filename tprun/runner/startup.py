"""Ranks start together or not at all: each publishes a verdict per start-up phase, and a failure on one
rank ends every rank within seconds, naming that rank and its reason.

Without this, a rank whose input is missing on its node (or whose engine ran out of memory while capturing
CUDA graphs) exits alone, and the others wait in the rendezvous or in a collective until `dist_timeout_s`.

    phase "plan":   local checks (plan.py) done; verdict: ready, nothing to do, or the error
    phase "engine": the engine is up (model loaded, KV cache allocated, graphs captured), or why not

Each verdict is a small JSON object under the rank's own key, parsed strictly by every reader (never
unpickled). While a rank builds its engine a guard thread watches for failures of the others: the main
thread may be blocked in a collective with the rank that failed, so the guard ends the process itself.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

from tprun.runner import keys
from tprun.runner.exit_codes import EXIT_BAD_INPUT, EXIT_CODES, EXIT_FAILED, EXIT_JOB_ERROR, EXIT_OK, EXIT_PEER_FAILED
from tprun.runner.store_values import StoreValueError, get_json, printable

READY = -1  # the verdict code of a rank that goes on to the next phase
POLL_S = 0.25
# How long a rank that failed keeps trying to reach the store to tell the others, and how long rank 0
# (when it hosts the store) stays up for them to read why: both well inside the 60 s a job may hang.
PUBLISH_TIMEOUT_S = 15.0
LINGER_S = 30.0
_CODES = EXIT_CODES | {READY}
_FIELDS = {"rank": int, "host": str, "code": int, "reason": str}
_RUNS = [0]  # boards created by this process: every rank runs its jobs in the same order


class StartFailed(Exception):
    """Some rank cannot start; the message names it and why, `code` is this rank's exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Verdict:
    rank: int
    host: str
    code: int
    reason: str

    def describe(self) -> str:
        return f"rank {self.rank} ({self.host}): {self.reason}"


class StartupBoard:
    def __init__(self, store: Any, rank: int, world_size: int, *, hosts_store: bool, timeout_s: float,
                 log: Callable[[str], None]) -> None:
        _RUNS[0] += 1
        self.store, self.rank, self.world_size = store, rank, world_size
        self.hosts_store, self.timeout_s, self.log = hosts_store, timeout_s, log
        self.prefix = f"{keys.PREFIX}run-{_RUNS[0]}/startup/"
        self.host = socket.gethostname()

    def _key(self, phase: str, what: str) -> str:
        return f"{self.prefix}{phase}/{what}"

    # -- this rank -------------------------------------------------------------------------------------

    def publish(self, phase: str, code: int = READY, reason: str = "") -> None:
        import json

        self.store.set(self._key(phase, str(self.rank)),
                       json.dumps({"rank": self.rank, "host": self.host, "code": code, "reason": printable(reason)}))
        if code not in (READY, EXIT_OK):
            self.store.add(self._key(phase, "failed"), 1)
        self.store.add(self._key(phase, "published"), 1)

    def wait(self, phase: str) -> int:
        """Block until every rank published `phase`; the common code (READY or EXIT_OK), or StartFailed as
        soon as one rank failed. Every rank that raises acks, so rank 0 can take the store down."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            failed = self._failures(phase)
            if failed:
                raise self._failure(phase, failed)
            if self.store.add(self._key(phase, "published"), 0) >= self.world_size:
                break
            if time.monotonic() > deadline:
                silent = [r for r in range(self.world_size) if not self.store.check([self._key(phase, str(r))])]
                raise StartFailed(f"rank(s) {silent} did not finish start-up phase {phase!r} within "
                                  f"{self.timeout_s:.0f} s (dist_timeout_s): not started, or stuck", EXIT_PEER_FAILED)
            time.sleep(POLL_S)
        verdicts = [self._read(phase, r) for r in range(self.world_size)]
        codes = {v.code for v in verdicts}
        if len(codes) > 1:  # some ranks find the job complete, others do not: they see different OUTs
            done = [v.rank for v in verdicts if v.code == EXIT_OK]
            raise StartFailed(f"rank(s) {done} find this job's complete results in the output directory but "
                              f"the others do not; --output must be a directory shared by all nodes",
                              EXIT_JOB_ERROR)
        return codes.pop()

    @contextlib.contextmanager
    def guard(self, phase: str, exit: Callable[[int], NoReturn] = os._exit) -> Iterator[None]:
        """While the body runs, a failure published by another rank ends this process (the main thread may
        be stuck in a collective with the failed rank, so it cannot be asked to return)."""
        store = self.store.clone() if hasattr(self.store, "clone") else self.store
        done = threading.Event()

        def watch() -> None:
            while not done.wait(POLL_S * 2):
                with contextlib.suppress(RuntimeError, OSError):  # the store going away is the watchdog's job
                    failed = _failures(store, self, phase)
                    if failed and not done.is_set():
                        e = self._failure(phase, failed, store)
                        self.log(f"stopping because {e}; exiting with {e.code}")
                        self.leave(store)
                        sys.stdout.flush()
                        sys.stderr.flush()
                        exit(e.code)

        t = threading.Thread(target=watch, name="tprun-start-guard", daemon=True)
        t.start()
        try:
            yield
        finally:
            done.set()
            t.join(timeout=POLL_S * 4 + 5)

    def leave(self, store: Any | None = None) -> None:
        """This rank will not use the store again; rank 0, when it hosts the store, waits (bounded) until every
        other rank said so, so that they read the reason rather than a closed socket."""
        store = store or self.store
        with contextlib.suppress(RuntimeError, OSError):
            if self.rank != 0:
                store.add(self.prefix + "left", 1)
                return
            if not self.hosts_store:
                return
            deadline = time.monotonic() + LINGER_S
            while store.add(self.prefix + "left", 0) < self.world_size - 1 and time.monotonic() < deadline:
                time.sleep(POLL_S)

    # -- the others ------------------------------------------------------------------------------------

    def _failures(self, phase: str) -> list[Verdict]:
        return _failures(self.store, self, phase)

    def _read(self, phase: str, rank: int, store: Any | None = None) -> Verdict:
        key = self._key(phase, str(rank))
        v = get_json(store or self.store, key, _FIELDS, max_bytes=16 * 1024)
        if v["rank"] != rank or v["code"] not in _CODES or len(v["host"]) > 255:
            raise StoreValueError(f"malformed value under store key {key!r}: not a verdict of rank {rank}; "
                                  "another process wrote into this job's store")
        return Verdict(v["rank"], printable(v["host"]), v["code"], printable(v["reason"]))

    def _failure(self, phase: str, failed: list[Verdict], store: Any | None = None) -> StartFailed:
        mine = next((v for v in failed if v.rank == self.rank), None)
        if mine is not None:
            code = mine.code
        else:  # a job error elsewhere is this rank's job error too: the same job must not be retried as is
            first = failed[0].code
            code = first if first in (EXIT_JOB_ERROR, EXIT_BAD_INPUT) else EXIT_PEER_FAILED
        what = "before the job started" if phase == "plan" else "while starting the engine"
        return StartFailed(f"{'; '.join(v.describe() for v in failed)} (failed {what})", code)


def open_board(spec: Any, launcher: Any, dargs: Any, log: Callable[[str], None], ready: bool) -> StartupBoard | None:
    """The job's store, before the engine's rendezvous. A rank that already failed tries for a bounded time
    only: it has its verdict, and the others wait for it no longer than their own rendezvous would."""
    from tprun.worker.distributed import connect_store

    try:
        timeout = spec.engine_config().dist_timeout_s
    except ValueError:  # invalid engine settings: this rank's verdict already says so
        timeout = PUBLISH_TIMEOUT_S
    connect_s = timeout if ready else min(timeout, PUBLISH_TIMEOUT_S)
    try:
        resolve = getattr(launcher, "resolve_master", None)
        if resolve is not None:  # e.g. Kubernetes: the master's DNS name may not exist yet
            resolve(connect_s)
        if not ready and dargs.rank != 0:
            # TCPStore's own connect retries for about twice its timeout, with a stack trace per try.
            _wait_listening(dargs.master_addr, dargs.master_port, connect_s)
        store = connect_store(dargs, connect_s)
    except Exception as e:  # noqa: BLE001 - an unreachable store is reported, whatever raised it
        log(f"error: {e}" if ready else f"could not tell the other ranks why this rank stops: {e}")
        return None
    return StartupBoard(store, dargs.rank, dargs.world_size, timeout_s=timeout, log=log,
                        hosts_store=not dargs.store_hosted_by_launcher)


def _wait_listening(host: str, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(2.0, timeout_s)):
                return
        except OSError as e:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing answers at {host}:{port} (MASTER_ADDR:MASTER_PORT) after "
                                   f"{timeout_s:.0f} s: {e}") from None
        time.sleep(POLL_S)


def settle(board: StartupBoard, phase: str, code: int, reason: str, log: Callable[[str], None]) -> int:
    """Publish this rank's verdict for `phase`; READY when every rank is ready, else this rank's exit code."""
    try:
        board.publish(phase, code, reason)
        result = code if code != READY else board.wait(phase)
    except StartFailed as e:
        log(f"stopping because {e}; exiting with {e.code}")
        result = e.code
    except StoreValueError as e:
        log(f"error: {e}")
        result = code if code != READY else EXIT_FAILED
    except (RuntimeError, OSError) as e:
        log(f"error: lost the job's store while ranks were starting: {e}; rank 0 probably died")
        result = code if code != READY else EXIT_PEER_FAILED
    if result != READY:
        board.leave()
    return result


def _failures(store: Any, board: StartupBoard, phase: str) -> list[Verdict]:
    """The verdicts of the ranks that failed in `phase`, by rank (one counter read while none did)."""
    if store.add(board._key(phase, "failed"), 0) == 0:
        return []
    found = []
    for r in range(board.world_size):
        if store.check([board._key(phase, str(r))]):
            v = board._read(phase, r, store)
            if v.code not in (READY, EXIT_OK):
                found.append(v)
    return found
