"""Subprocesses for tests: every launch has a timeout and takes its whole process tree down with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    from tprun.launchers.local import free_port as local_free_port

    return local_free_port()


# A child must not inherit the launcher the test suite itself may run under (a Slurm job, a pod, torchrun):
# the adapters would read it instead of what the test sets.
LAUNCHER_PREFIXES = ("TPRUN_", "SLURM_", "OMPI_", "PMI_", "TORCHELASTIC_", "LWS_")
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "JOB_COMPLETION_INDEX")


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_PREFIXES) and k not in LAUNCHER_VARS}
    return {**env, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1", **extra}


def run(cmd: list[str], timeout: float, env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
    """subprocess.run, but a timeout kills the whole process group (torchrun's workers included)."""
    proc = subprocess.Popen(cmd, env=env or child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{cmd[:6]}... still running after {timeout} s\n{out[-2000:]}\n{err[-4000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def torchrun(nproc: int, script_and_args: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(free_port()), *script_and_args]
    return run(cmd, timeout, child_env(**env))
