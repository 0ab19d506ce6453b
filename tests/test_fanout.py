"""Several processes per pod: `python3 -m tprun.launchers.fanout -n N -- CMD`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

FANOUT = [sys.executable, "-m", "tprun.launchers.fanout"]


def run(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*FANOUT, *args], capture_output=True, text=True, timeout=timeout, check=False)


def test_each_child_gets_its_local_rank(tmp_path):
    code = f"import os, pathlib; pathlib.Path({str(tmp_path)!r}, os.environ['TPRUN_LOCAL_RANK']).touch()"
    r = run(["-n", "3", "--", sys.executable, "-c", code])
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0", "1", "2"]


def test_first_failure_stops_the_others_and_becomes_the_pod_exit_code():
    # Child 1 fails at once; the others would sleep for a minute if nobody stopped them.
    code = "import os, sys, time; r = os.environ['TPRUN_LOCAL_RANK']; sys.exit(76) if r == '1' else time.sleep(60)"
    t0 = time.monotonic()
    r = run(["-n", "3", "--", sys.executable, "-c", code])
    assert r.returncode == 76
    assert time.monotonic() - t0 < 20


def test_sigterm_reaches_every_child(tmp_path):
    code = ("import os, signal, sys, time, pathlib\n"
            "def stop(*_):\n"
            f"    pathlib.Path({str(tmp_path)!r}, os.environ['TPRUN_LOCAL_RANK']).write_text('stopped')\n"
            "    sys.exit(75)\n"
            "signal.signal(signal.SIGTERM, stop)\n"
            f"pathlib.Path({str(tmp_path)!r}, 'ready-' + os.environ['TPRUN_LOCAL_RANK']).touch()\n"
            "time.sleep(60)\n")
    proc = subprocess.Popen([*FANOUT, "-n", "2", "--", sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 30
        while not all((tmp_path / f"ready-{i}").exists() for i in range(2)) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGTERM)  # what the kubelet sends the container's main process
        assert proc.wait(timeout=30) == 75  # the children's "rerun to resume" code, passed on
    finally:
        proc.kill()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("ready")) == ["0", "1"]


def test_missing_command_is_a_usage_error():
    r = run(["-n", "2"])
    assert r.returncode == 2
    assert "give the command after --" in r.stderr
