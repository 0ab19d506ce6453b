"""What Kubernetes launchers share: processes in pods, and a master whose DNS name appears late.

A pod knows its own index among the pods of its group; it may run one process or several (the
fan-out in launchers/fanout.py gives each its TPRUN_LOCAL_RANK), so rank = pod index * procs + i.
Ranks are static: they come from the controller's index, never from an elastic rendezvous.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from typing import ClassVar

from tprun.launchers.base import Launcher, LauncherError

log = logging.getLogger(__name__)

DEFAULT_DNS_TIMEOUT_S = 300.0
DEFAULT_MASTER_PORT = 29500


class PodLauncher(Launcher):
    """Subclasses map `pod_index`, `num_pods` and `master_addr` in their table."""

    # Appended to "variable X is not set": who was supposed to set it.
    env_hint: ClassVar[str] = ""

    PER_POD_ENV: ClassVar[dict[str, str]] = {
        "procs_per_pod": "TPRUN_PROCS_PER_POD",
        "local_rank": "TPRUN_LOCAL_RANK",
        "master_port": "MASTER_PORT",
        "dns_timeout_s": "TPRUN_DNS_TIMEOUT_S",
    }

    def dns_hint(self) -> str:
        """Appended to a DNS timeout: where to look when the master's name never appears."""
        return ""

    def _get(self, field: str, default: str | None = None) -> str:
        try:
            return super()._get(field, default)
        except LauncherError as e:
            raise LauncherError(f"{e}; {self.env_hint}" if self.env_hint else str(e)) from None

    @property
    def local_world_size(self) -> int:
        procs = self._int("procs_per_pod", default=1)
        if procs < 1:
            raise LauncherError(f"{self.name}: TPRUN_PROCS_PER_POD={procs} must be >= 1")
        return procs

    @property
    def local_rank(self) -> int:
        local, procs = self._int("local_rank", default=0), self.local_world_size
        if not 0 <= local < procs:
            raise LauncherError(
                f"{self.name}: TPRUN_LOCAL_RANK={local} is outside the {procs} processes of this pod "
                f"(TPRUN_PROCS_PER_POD={procs}); start several processes per pod with tprun.launchers.fanout"
            )
        return local

    @property
    def pod_index(self) -> int:
        index, pods = self._int("pod_index"), self.num_pods
        if not 0 <= index < pods:
            raise LauncherError(
                f"{self.name}: pod index {self.env['pod_index']}={index} is outside the "
                f"{pods} pods ({self.env['num_pods']}); the controller's pod count and the value "
                "the manifest passes must agree (re-render the manifest)"
            )
        return index

    @property
    def num_pods(self) -> int:
        pods = self._int("num_pods")
        if pods < 1:
            raise LauncherError(f"{self.name}: {self.env['num_pods']}={pods} must be >= 1")
        return pods

    @property
    def rank(self) -> int:
        return self.pod_index * self.local_world_size + self.local_rank

    @property
    def world_size(self) -> int:
        return self.num_pods * self.local_world_size

    @property
    def master_port(self) -> int:
        return self._int("master_port", default=DEFAULT_MASTER_PORT)

    @property
    def dns_timeout_s(self) -> float:
        raw = self.environ.get(self.env["dns_timeout_s"])
        if not raw:
            return DEFAULT_DNS_TIMEOUT_S
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if not value > 0:
            raise LauncherError(f"{self.name}: {self.env['dns_timeout_s']}={raw!r} must be a number > 0")
        return value

    def resolve_master(self, timeout_s: float | None = None) -> None:
        """Wait until the master's name resolves; call before init_process_group.

        A pod starts before its DNS record is published (and pod 0 may start last), so the first
        lookups fail with NXDOMAIN. The job's own TPRUN_DNS_TIMEOUT_S (from the spec) wins over
        the caller's `timeout_s`, which is only a default. Never called by `tprun env`.
        """
        if self.environ.get(self.env["dns_timeout_s"]) or timeout_s is None:
            timeout_s = self.dns_timeout_s
        resolve_host(self.master_addr, self.master_port, timeout_s, who=self.name, hint=self.dns_hint())


def resolve_host(
    host: str,
    port: int,
    timeout_s: float,
    *,
    who: str = "tprun",
    hint: str = "",
    first_delay_s: float = 0.1,
    max_delay_s: float = 5.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> list[str]:
    """The addresses of `host`, retrying with exponential backoff until `timeout_s` has passed."""
    deadline = clock() + timeout_s
    delay, attempts = first_delay_s, 0
    while True:
        attempts += 1
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            addrs = sorted({info[4][0] for info in infos})
            if attempts > 1:
                log.warning("%s: %s resolved to %s after %d attempts", who, host, ", ".join(addrs), attempts)
            return addrs
        except OSError as e:  # gaierror (NXDOMAIN, EAI_AGAIN) and resolver I/O errors alike
            last = e
        remaining = deadline - clock()
        if remaining <= 0:
            break
        if attempts == 1:
            log.warning("%s: %s does not resolve yet (%s); retrying for up to %g s", who, host, last, timeout_s)
        sleep(min(delay, remaining))
        delay = min(delay * 2, max_delay_s)
    reason = getattr(last, "strerror", None) or str(last)
    raise LauncherError(
        f"{who}: the master host {host!r} did not resolve within {timeout_s:g} s "
        f"({attempts} attempts, last error: {reason})" + (f". {hint}" if hint else "")
    )
