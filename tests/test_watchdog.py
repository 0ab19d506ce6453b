"""No hang: whichever rank dies or freezes, every other rank exits with 76 soon after, naming it.

Bare ranks (a store and a Watchdog, no model) with a 5 s timeout, so each case takes seconds (and a
healthy rank starved for a second or two on a busy machine is not taken for a dead one); the default
timeout inside a real job is covered by test_dp_tp.py.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from tests.runner_harness import ROOT, base_env, free_port
from tprun.runner.exit_codes import EXIT_PEER_FAILED

pytestmark = pytest.mark.slow

PERIOD_S, TIMEOUT_S = 0.5, 5.0
REACT_S = TIMEOUT_S + 20  # detection, then the others reading ABORT, on a busy machine


@pytest.fixture
def ranks(tmp_path):
    port = free_port()
    procs, logs = [], []
    for r in range(4):
        log = open(tmp_path / f"rank{r}.log", "w+")
        procs.append(subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "watchdog_check.py"), str(r), "4", str(port), str(PERIOD_S),
             str(TIMEOUT_S)], env=base_env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
        logs.append(log)
    deadline = time.monotonic() + 60
    while not all("watching" in (tmp_path / f"rank{r}.log").read_text() for r in range(4)):
        assert time.monotonic() < deadline, "ranks did not start"
        time.sleep(0.05)
    yield procs, tmp_path
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=30)
    for log in logs:
        log.close()


def outcome(procs, tmp_path, victim: int, limit_s: float) -> dict[int, str]:
    t0 = time.monotonic()
    survivors = [r for r in range(4) if r != victim]
    while any(procs[r].poll() is None for r in survivors):
        assert time.monotonic() - t0 < limit_s, f"survivors still running after {limit_s} s"
        time.sleep(0.05)
    assert [procs[r].returncode for r in survivors] == [EXIT_PEER_FAILED] * 3
    return {r: (tmp_path / f"rank{r}.log").read_text() for r in survivors}


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["dies", "freezes"])
def test_a_lost_rank_is_named_and_everyone_else_exits(ranks, sig):
    procs, tmp_path = ranks
    procs[2].send_signal(sig)
    logs = outcome(procs, tmp_path, victim=2, limit_s=REACT_S)
    # Rank 1 watches rank 2 and names it; the others stop on the reason rank 1 published.
    assert "rank 2 (" in logs[1] and "stopped heartbeating" in logs[1] and "seen by rank 1" in logs[1]
    assert all("stopping because rank 2 (" in logs[r] for r in (0, 3))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["dies", "freezes"])
def test_losing_the_store_host_ends_every_rank(ranks, sig):
    procs, tmp_path = ranks
    procs[0].send_signal(sig)
    logs = outcome(procs, tmp_path, victim=0, limit_s=REACT_S)
    for text in logs.values():
        assert "rank 0" in text and "store" in text, text
