"""Preemption: a stop signal means "stop claiming work, finish the chunk in flight, exit for requeue".

Slurm (scancel, scontrol requeue, preemption, submitit's --signal=USR2) and Kubernetes (pod deletion,
eviction) announce the end with SIGTERM or SIGUSR1/2, then SIGKILL after a grace period. The first signal
only sets a flag that the job loop reads at chunk boundaries; the chunk in flight finishes and is written
atomically. If the grace period is shorter than a chunk, SIGKILL abandons it: its part was never renamed
into place, so nothing partial is visible and a rerun redoes it. A second signal abandons at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

from tprun.runner.exit_codes import EXIT_REQUEUE

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


class StopFlag:
    """Set by the first stop signal; a second one exits at once with EXIT_REQUEUE."""

    def __init__(self, log: Callable[[str], None] | None = None) -> None:
        self.signal_name: str | None = None
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._previous: dict[int, object] = {}
        self._received: set[int] = set()

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def request(self, reason: str) -> None:
        self.signal_name = reason

    def install(self) -> StopFlag:
        # Signal handlers can only be set from the main thread; elsewhere (a test harness, an embedding
        # application) preemption is the caller's business and the flag simply stays unset.
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        # Only a signal already received abandons the chunk: schedulers announce one stop with a pair of
        # different signals (submitit's interrupt: TERM then USR2), and the end of a grace period with the
        # same signal again (Slurm: TERM, CONT, TERM).
        if self.requested and signum not in self._received:
            self._received.add(signum)
            self.log(f"{name} too: already stopping ({self.signal_name}); send {name} again to abandon the "
                      "chunk(s) in flight")
            return
        self._received.add(signum)
        if self.requested:
            self.log(f"{name} again: abandoning the chunk(s) in flight; exiting with "
                      f"{EXIT_REQUEUE} (requeue)")
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_REQUEUE)
        self.signal_name = name
        self.log(f"{name}: finishing the chunk(s) in flight, then exiting with {EXIT_REQUEUE} "
                  "(requeue); a rerun resumes. Send it again to abandon the chunk(s) now.")
