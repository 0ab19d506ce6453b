"""Leases in the output directory (tprun/runner/leases.py) and exactly-once publishing of parts.

Time is moved by setting mtimes into the past (what a lease that nobody renewed looks like to the
filesystem), not by sleeping, except for the one test of the renewing thread.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from tprun.runner import parts
from tprun.runner.leases import LeaseDir, Renewer, create_exclusive
from tprun.runner.records import TPRUN

TIMEOUT = 30.0


def _age(path: Path, seconds: float) -> None:
    """Make `path` look as if last touched `seconds` ago by the filesystem's clock."""
    t = os.stat(path).st_mtime - seconds
    os.utime(path, (t, t))


def test_a_live_lease_is_exclusive_and_a_stale_one_is_taken_over(tmp_path):
    a, b = LeaseDir(tmp_path, group=0, timeout_s=TIMEOUT), LeaseDir(tmp_path, group=1, timeout_s=TIMEOUT)
    assert a.state("chunk-000003") == "free"
    la = a.try_claim("chunk-000003")
    assert la is not None and la.generation == 0 and a.holds(la)
    assert json.loads(la.path.read_text())["group"] == 0
    assert b.try_claim("chunk-000003") is None and b.state("chunk-000003") == "live"
    assert a.renew(la)

    _age(la.path, TIMEOUT + 5)  # a dead or paused holder: nobody renewed it for longer than the timeout
    assert b.state("chunk-000003") == "stale"
    lb = b.try_claim("chunk-000003")
    assert lb is not None and lb.generation == 1 and b.holds(lb)
    assert not a.holds(la) and not a.renew(la)  # the old holder learns it lost the lease
    assert a.try_claim("chunk-000003") is None  # and cannot grab it back while b's lease is live


def test_staleness_is_judged_by_the_filesystems_clock(tmp_path):
    leases = LeaseDir(tmp_path, group=0, timeout_s=TIMEOUT)
    assert abs(leases.now() - time.time()) < 5  # a local filesystem stamps this host's time
    lease = leases.try_claim("merge")
    assert lease is not None
    t = leases.now() + 3600  # a lease touched "in the future" (another host's clock ahead) is live, not stale
    os.utime(lease.path, (t, t))
    assert LeaseDir(tmp_path, group=1, timeout_s=TIMEOUT).state("merge") == "live"


def _race(out: str, start: float, q: multiprocessing.Queue) -> None:
    leases = LeaseDir(Path(out), group=os.getpid(), timeout_s=TIMEOUT)
    while time.time() < start:
        pass
    lease = leases.try_claim("chunk-000000")
    q.put((os.getpid(), None if lease is None else lease.generation))


def test_of_many_groups_taking_over_at_once_exactly_one_wins(tmp_path):
    first = LeaseDir(tmp_path, group=99, timeout_s=TIMEOUT).try_claim("chunk-000000")
    _age(first.path, TIMEOUT + 5)
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    start = time.time() + 0.5
    procs = [ctx.Process(target=_race, args=(str(tmp_path), start, q)) for _ in range(6)]
    for p in procs:
        p.start()
    results = [q.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    winners = [pid for pid, gen in results if gen is not None]
    assert len(winners) == 1 and [gen for _, gen in results if gen is not None] == [1]
    assert json.loads(LeaseDir(tmp_path, 0).path("chunk-000000", 1).read_text())["group"] == winners[0]


def test_create_exclusive_never_shows_a_partial_file_and_refuses_an_existing_one(tmp_path):
    assert create_exclusive(tmp_path / "x", b'{"a": 1}')
    assert not create_exclusive(tmp_path / "x", b'{"a": 2}')
    assert json.loads((tmp_path / "x").read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # no temp file left behind


def test_the_renewer_keeps_a_lease_live_and_it_goes_stale_once_the_renewer_stops(tmp_path):
    holder, other = LeaseDir(tmp_path, 0, timeout_s=1.0), LeaseDir(tmp_path, 1, timeout_s=1.0)
    lease = holder.try_claim("chunk-000001")
    renewer = Renewer(holder, period_s=0.2).start()
    renewer.add(lease)
    time.sleep(1.6)
    assert other.try_claim("chunk-000001") is None  # renewed: still live well past the timeout
    renewer.stop()  # what SIGSTOP or kill -9 does to the renewing thread
    time.sleep(1.6)
    taken = other.try_claim("chunk-000001")
    assert taken is not None and not holder.holds(lease)


RECORDS = [{"line": i, "id": id_, "output_text": "x", "output_token_ids": [1], "finish_reason": "length",
            "stop_reason": None, "num_prompt_tokens": 3} for i, id_ in enumerate("ab")]


def test_of_two_writers_of_one_chunk_exactly_one_publishes_and_the_merge_reads_only_its_part(tmp_path):
    a, b = LeaseDir(tmp_path, 0, TIMEOUT), LeaseDir(tmp_path, 1, TIMEOUT)
    la = a.try_claim("chunk-000000")
    _age(la.path, TIMEOUT + 5)  # a was paused (SIGSTOP) past the timeout; b redid the chunk
    lb = b.try_claim("chunk-000000")
    assert parts.publish_part(tmp_path, 0, lb.nonce, RECORDS, {"records": 2}, lambda: b.holds(lb))
    # a wakes up (SIGCONT) and finishes its copy: it has lost the lease, and the chunk is done anyway
    assert not parts.publish_part(tmp_path, 0, la.nonce, RECORDS, {"records": 2}, lambda: a.holds(la))
    # even a writer that checked its lease just before losing it cannot publish a second time
    assert not parts.publish_part(tmp_path, 0, "late", RECORDS, {"records": 2})
    assert [p.name for p in (tmp_path / parts.PARTS).glob("*.jsonl")] == [f"chunk-000000.{lb.nonce}.jsonl"]
    assert parts.read_done(tmp_path, 0)["part"] == f"chunk-000000.{lb.nonce}.jsonl"
    stats = parts.merge(tmp_path, 1, [], TPRUN)
    lines = (tmp_path / parts.RESULTS).read_text().splitlines()
    assert stats.records == 2 and [json.loads(x)["id"] for x in lines] == ["a", "b"]


@pytest.mark.parametrize("timeout", [0, -1])
def test_a_lease_timeout_must_be_positive(tmp_path, timeout):
    with pytest.raises(ValueError, match="lease timeout must be > 0"):
        LeaseDir(tmp_path, 0, timeout_s=timeout)
