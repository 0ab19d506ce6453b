"""Leases in the output directory: how independent TP groups, which share nothing but OUT, split the work.

A lease on a name (a chunk, or the merge) is a chain of generation files `OUT/leases/<name>.<G>`, each
holding the claimant's group and a random nonce. Only *creating* files decides anything, and every file
is created exclusively (link of a fully written temp file, which fails with EEXIST: NFS v3+, Lustre, GPFS
and RWX volumes honour it), so of two groups that race for the same generation exactly one wins, and the
loser knows it from its failed link:
  - claim a free name: create generation 0;
  - take over a stale lease (newest generation G not renewed for `timeout_s`): create generation G+1.
The holder of generation G keeps the lease alive by touching its file (os.utime) and still holds it as
long as no generation G+1 exists. Staleness is judged against the shared filesystem's clock: "now" is
the mtime the server stamps on a probe file we touch, never this host's clock, which may differ from
the other hosts' by any amount.

A lease only keeps two groups from doing the same chunk twice in the normal case; a writer that was
paused past the timeout may still finish a chunk someone else redid. Exactly-once results come from
parts.publish_part: the done marker is created exclusively and names the one part file that counts.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

LEASES = "leases"
DEFAULT_TIMEOUT_S = 120.0
MAX_GENERATIONS = 10_000  # a bound on the probe for the newest generation; no lease is taken over this often

LeaseState = Literal["free", "live", "stale"]


@dataclass(frozen=True)
class Lease:
    name: str
    generation: int
    nonce: str
    path: Path


def create_exclusive(path: Path, data: bytes) -> bool:
    """Create `path` holding `data`, only if it does not exist: True if this call created it.

    The data is written and fsynced under a unique temp name first and then hard-linked into place, so a
    reader never sees a partial file. On NFS a link whose reply was lost fails on retry with EEXIST although
    it succeeded; the temp file's link count (2) tells the truth.
    """
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(8)}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
        created = True
    except FileExistsError:
        created = os.stat(tmp).st_nlink == 2
    except OSError as e:
        if e.errno not in (errno.EIO, errno.ETIMEDOUT):
            raise
        created = os.stat(tmp).st_nlink == 2
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return created


class LeaseDir:
    """The leases of one output directory, as seen by one group."""

    def __init__(self, out: Path, group: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if timeout_s <= 0:
            raise ValueError(f"lease timeout must be > 0 seconds, got {timeout_s}")
        self.dir = Path(out) / LEASES
        self.dir.mkdir(parents=True, exist_ok=True)
        self.group = group
        self.timeout_s = timeout_s
        self._probe = self.dir / f".clock-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"

    def now(self) -> float:
        """The filesystem's current time: the mtime it stamps on a file we touch just now."""
        try:
            os.utime(self._probe, None)
        except FileNotFoundError:
            self._probe.touch()
        return os.stat(self._probe).st_mtime

    def close(self) -> None:
        self._probe.unlink(missing_ok=True)

    def path(self, name: str, generation: int) -> Path:
        return self.dir / f"{name}.{generation}"

    def newest(self, name: str) -> int:
        """The newest generation of `name`'s lease, -1 if it was never claimed."""
        g = -1
        while g + 1 < MAX_GENERATIONS and self.path(name, g + 1).exists():
            g += 1
        return g

    def state(self, name: str, now: float | None = None) -> LeaseState:
        g = self.newest(name)
        if g < 0:
            return "free"
        try:
            mtime = os.stat(self.path(name, g)).st_mtime
        except FileNotFoundError:  # removed by hand: as good as free
            return "free"
        return "stale" if (self.now() if now is None else now) - mtime > self.timeout_s else "live"

    def try_claim(self, name: str) -> Lease | None:
        """The lease on `name` if it is free or stale and this call wins it; None if another group holds it
        (or won the race for it just now)."""
        g = self.newest(name)
        if g >= 0:
            try:
                mtime = os.stat(self.path(name, g)).st_mtime
            except FileNotFoundError:
                mtime = None
            if mtime is not None and self.now() - mtime <= self.timeout_s:
                return None
        nonce = secrets.token_hex(8)
        body = json.dumps({"group": self.group, "nonce": nonce, "host": socket.gethostname(),
                           "pid": os.getpid(), "generation": g + 1}).encode()
        path = self.path(name, g + 1)
        if not create_exclusive(path, body):
            return None
        os.utime(path, None)  # the link kept the temp file's mtime; stamp the claim itself
        return Lease(name, g + 1, nonce, path)

    def holds(self, lease: Lease) -> bool:
        """Still ours: nobody has taken it over (no newer generation), and the file is the one we made."""
        if self.path(lease.name, lease.generation + 1).exists():
            return False
        try:
            return json.loads(lease.path.read_text()).get("nonce") == lease.nonce
        except (FileNotFoundError, json.JSONDecodeError):
            return False

    def renew(self, lease: Lease) -> bool:
        """Touch the lease; False if it is no longer ours (then touching it changes nothing that counts)."""
        with contextlib.suppress(FileNotFoundError):
            os.utime(lease.path, None)
        return self.holds(lease)


class Renewer:
    """Renews the held leases from a thread, every timeout/4: a process that is stopped (SIGSTOP, a
    frozen VM) or dead stops renewing with it, and its leases go stale for others to take over."""

    def __init__(self, leases: LeaseDir, period_s: float | None = None) -> None:
        self.leases = leases
        self.period_s = period_s if period_s is not None else leases.timeout_s / 4
        self._held: dict[str, Lease] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tprun-lease-renewer", daemon=True)
        self.lost: list[str] = []  # names whose lease another group took over while we held it

    def start(self) -> Renewer:
        self._thread.start()
        return self

    def add(self, lease: Lease) -> None:
        with self._lock:
            self._held[lease.name] = lease

    def drop(self, name: str) -> None:
        with self._lock:
            self._held.pop(name, None)

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            with self._lock:
                held = list(self._held.values())
            for lease in held:
                try:
                    if not self.leases.renew(lease):
                        self.lost.append(lease.name)
                        self.drop(lease.name)
                except OSError:  # a flaky filesystem: try again next period; the lease may go stale
                    pass

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.period_s + 5)
