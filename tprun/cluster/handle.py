"""What `tprun.submit` returns, whichever cluster runs the job."""

from __future__ import annotations

import abc
import time
from typing import Literal

JobState = Literal["PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED", "UNKNOWN"]
FINAL_STATES: frozenset[str] = frozenset({"COMPLETED", "FAILED", "CANCELLED"})


class JobHandle(abc.ABC):
    job_id: str

    @abc.abstractmethod
    def status(self) -> JobState: ...

    @abc.abstractmethod
    def cancel(self) -> None: ...

    @abc.abstractmethod
    def logs(self) -> str: ...

    def wait(self, timeout: float | None = None, poll_s: float = 2.0) -> JobState:
        """Block until the job reaches a final state; TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            state = self.status()
            if state in FINAL_STATES:
                return state
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {self.job_id} still {state} after {timeout:.0f} s")
            time.sleep(poll_s)
