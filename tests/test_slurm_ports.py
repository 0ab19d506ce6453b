"""Slurm master ports derived from the job id: concurrent jobs on one node do not collide, and a port that
is taken anyway is named, with MASTER_PORT as the way out."""

from __future__ import annotations

import socket
import sys

from tests.procs import ROOT, run
from tests.runner_harness import base_env
from tprun.launchers.slurm import PORT_BASE, PORT_SPAN, SlurmLauncher

PROMPTS = ROOT / "examples" / "prompts.jsonl"


def task_env(job_id: int, step: int = 0) -> dict[str, str]:
    """One srun task of a one-task step on this host."""
    return {"SLURM_JOB_ID": str(job_id), "SLURM_STEP_ID": str(step), "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
            "SLURM_NTASKS": "1", "SLURM_NODEID": "0", "SLURM_STEP_NODELIST": "localhost",
            "SLURM_STEP_TASKS_PER_NODE": "1"}


def port(job_id: int, step: int = 0) -> int:
    return SlurmLauncher(task_env(job_id, step)).master_port


def test_jobs_1000_ids_apart_get_different_ports():
    for job in (1, 4242, 123_456, 9_999_000):
        ports = [port(job + 1000 * k) for k in range(17)]
        assert len(set(ports)) == 17, ports


def test_no_two_steps_of_jobs_within_1000_ids_share_a_port():
    ports = [port(job, step) for job in range(500_000, 501_000) for step in range(16)]
    assert len(set(ports)) == len(ports) == 16_000
    assert all(PORT_BASE <= p < PORT_BASE + PORT_SPAN <= 32768 for p in ports)  # below the ephemeral range


def test_derived_port_in_use_names_the_port_and_master_port(demo_model, tmp_path):
    job_id = 77_001
    busy_port = port(job_id)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", busy_port))
        busy.listen()
        cmd = [sys.executable, "-m", "tprun", "run", "--model", str(demo_model), "--input", str(PROMPTS),
               "--output", str(tmp_path / "out"), "--quiet"]
        r = run(cmd, timeout=120, env=base_env(**task_env(job_id)), cwd=ROOT)
    assert r.returncode != 0
    assert f"master port {busy_port} on localhost is already in use; set MASTER_PORT to a free port" in r.stderr, (
        r.stderr[-3000:])
