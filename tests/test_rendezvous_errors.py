"""A rendezvous that cannot happen ends with a message saying what to fix, within the timeout."""

from __future__ import annotations

import socket
import sys
import time

from tests.procs import ROOT, free_port, run
from tests.runner_harness import base_env

PROMPTS = ROOT / "examples" / "prompts.jsonl"


def _tprun_run(demo_model, out, env: dict[str, str], *extra: str):
    cmd = [sys.executable, "-m", "tprun", "run", "--model", str(demo_model), "--input", str(PROMPTS),
           "--output", str(out), "--quiet", *extra]
    return run(cmd, timeout=120, env=base_env(MASTER_ADDR="127.0.0.1", **env), cwd=ROOT)


def test_master_port_already_in_use_is_named(demo_model, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = _tprun_run(demo_model, tmp_path / "out", {"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": str(port)})
    assert r.returncode != 0
    assert f"master port {port} on 127.0.0.1 is already in use; set MASTER_PORT to a free port" in r.stderr
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_unreachable_master_fails_within_the_timeout_naming_the_address(demo_model, tmp_path):
    port = free_port()  # nobody listens there: rank 0 never started
    t0 = time.monotonic()
    r = _tprun_run(demo_model, tmp_path / "out", {"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": str(port)},
                   "--dp", "2", "--engine", "dist_timeout_s=5")
    assert r.returncode != 0
    assert time.monotonic() - t0 < 60
    assert f"rank 1 could not reach the rendezvous store at tcp://127.0.0.1:{port} within 5 s" in r.stderr
    assert "check that rank 0 started and MASTER_ADDR/MASTER_PORT point to it" in r.stderr
