"""Slurm: one srun task per process; ranks come from the step's own variables.

When is a process one of a job's tasks? Only inside a job step, which srun creates: there
SLURM_STEP_ID (SLURM_STEPID before 20.11), SLURM_PROCID and SLURM_NTASKS describe the step.
  - The batch script itself has SLURM_PROCID=0 and the job's SLURM_NTASKS but no step id: a `tprun run`
    there without srun is one process, not rank 0 of the job.
  - A `salloc` shell has neither SLURM_PROCID nor a step id: its SLURM_NTASKS is the allocation's.
  - An `srun --pty bash` shell is a step of one task (SLURM_PTY_PORT set): it is an interactive shell
    on a compute node, and a tprun started from it runs as a single local process (with a free port,
    so several runs from one shell never fight over the job's derived port). A pty step of several
    tasks, and an srun nested in a pty shell (its tasks inherit SLURM_PTY_PORT), are real steps:
    every task is a rank.
Variables of the step win over those of the job: `srun -N1 -w node02` inside a two-node allocation has
SLURM_JOB_NODELIST=node[01-02] but its rank 0 runs on node02 (SLURM_STEP_NODELIST), and SLURM_NODEID
counts the step's nodes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from tprun.launchers.base import Launcher, LauncherError
from tprun.launchers.hostlist import expand_counts, first_host

# The derived master port: PORT_BASE + (job_id * STEPS_PER_JOB + step % STEPS_PER_JOB) mod PORT_SPAN, below
# Linux's ephemeral range (32768-60999), so no outgoing connection can be holding it. PORT_SPAN is prime:
# two (job, step) pairs share a port only when 16 * (job1 - job2) + (step1 - step2) is a multiple of it.
# So no two steps of jobs fewer than 1047 ids apart share a port, and jobs with the same step collide only
# when their ids differ by a multiple of 16763. (A span of 16000 made every job 1000 ids apart collide.)
PORT_BASE, PORT_SPAN, STEPS_PER_JOB = 16000, 16763, 16


class SlurmLauncher(Launcher):
    name = "slurm"
    env: ClassVar[dict[str, str]] = {
        "rank": "SLURM_PROCID",
        "local_rank": "SLURM_LOCALID",
        "world_size": "SLURM_NTASKS",
        "node_rank": "SLURM_NODEID",
        "job_id": "SLURM_JOB_ID",
        "step_id": "SLURM_STEP_ID",
        "master_addr": "MASTER_ADDR",  # an explicit value wins over the node list
        "master_port": "MASTER_PORT",  # an explicit value wins over the job id
    }
    # First set variable wins: the step's view, then the job's.
    nodelist_vars: ClassVar[tuple[str, ...]] = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    tasks_per_node_vars: ClassVar[tuple[str, ...]] = (
        "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE")
    step_id_vars: ClassVar[tuple[str, ...]] = ("SLURM_STEP_ID", "SLURM_STEPID")

    @classmethod
    def matches(cls, environ: Mapping[str, str]) -> bool:
        in_step = all(environ.get(v) for v in ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS")) and any(
            environ.get(v) for v in cls.step_id_vars
        )
        interactive_shell = bool(environ.get("SLURM_PTY_PORT")) and environ.get("SLURM_NTASKS") == "1"
        return in_step and not interactive_shell

    def _first(self, names: tuple[str, ...]) -> tuple[str, str]:
        for var in names:
            if self.environ.get(var):
                return var, self.environ[var]
        raise LauncherError(f"slurm: none of {', '.join(names)} is set; is this an srun task?")

    @property
    def local_world_size(self) -> int:
        var, value = self._first(self.tasks_per_node_vars)
        counts = expand_counts(value)
        node = self._int("node_rank", default=0)
        if len(counts) == 1:
            return counts[0]
        if node >= len(counts):
            raise LauncherError(f"slurm: SLURM_NODEID={node} but {var}={value!r} lists {len(counts)} nodes")
        return counts[node]

    @property
    def master_addr(self) -> str:
        if self.environ.get("MASTER_ADDR"):
            return self.environ["MASTER_ADDR"]
        var, value = self._first(self.nodelist_vars)
        try:
            return first_host(value)
        except LauncherError as e:
            raise LauncherError(f"slurm: {var}: {e}") from None

    @property
    def master_port(self) -> int:
        if self.environ.get("MASTER_PORT"):
            return self._int("master_port")
        step_var, step = self._first(self.step_id_vars)
        try:
            job_id, step_id = int(self._get("job_id")), int(step)
        except ValueError:
            raise LauncherError(
                f"slurm: SLURM_JOB_ID={self.environ.get('SLURM_JOB_ID')!r} / {step_var}={step!r} must be "
                "integers to derive the master port; set MASTER_PORT explicitly"
            ) from None
        return PORT_BASE + (job_id * STEPS_PER_JOB + step_id % STEPS_PER_JOB) % PORT_SPAN
