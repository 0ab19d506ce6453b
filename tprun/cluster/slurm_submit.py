"""`tprun.submit(spec, backend="slurm")`: the job through submitit, one srun task per process.

Each task unpickles a `TprunTask` and runs the tprun job in-process, reading its rank from Slurm
exactly as `tprun run` under deploy/slurm.sbatch does. A rank that fails raises, so its traceback
and the end of its stderr land in submitit's result for that task and in `logs()`.

Preemption and time limits: submitit asks for its signal (USR2 unless SUBMITIT_PREEMPT_SIGNAL says
otherwise) spec.slurm.signal's seconds before the end; a preemption sends SIGTERM (and, where Slurm has
preempt_send_user_signal, that signal too); submitit's Job._interrupt() sends SIGTERM then USR2. tprun
stops claiming chunks, finishes the one in flight (or abandons it on a second signal) and every task
exits 75. The batch script then requeues the job, as deploy/slurm.sbatch does (its teardown is
slurm_render.requeue_after_srun): not the task, which cannot once tprun has left with os._exit. The job
restarts with the same id and folder and resumes, skipping finished chunks. A cancel wins: scancel's
SIGTERM also ends tprun with 75, but a job that is no longer RUNNING is not requeued (nor one Slurm
preempts and requeues on its own).
"""

from __future__ import annotations

import os
import shlex
import signal
import stat
import subprocess
import sys
from pathlib import Path

from tprun.cluster.handle import JobHandle, JobState
from tprun.cluster.slurm_render import (
    THREADS,
    extra_sbatch_options,
    nodes_per_task,
    requeue_after_srun,
    sbatch_options,
)
from tprun.config import JobSpec
from tprun.runner.exit_codes import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_JOB_ERROR, EXIT_OK, EXIT_PEER_FAILED, EXIT_REQUEUE
from tprun.runner.signals import STOP_SIGNALS

try:
    import submitit
except ImportError as e:
    raise ImportError("submitting to Slurm needs submitit: pip install 'tprun[launch]'") from e

# sacct's State column (first word: "CANCELLED by 0") -> JobState. PREEMPTED, NODE_FAIL and REQUEUED
# jobs come back when requeueing is on, so they only count as final when it is off.
SACCT_STATES: dict[str, JobState] = {
    "PENDING": "PENDING", "REQUEUED": "PENDING", "REQUEUE_HOLD": "PENDING", "REQUEUE_FED": "PENDING",
    "CONFIGURING": "PENDING", "RESV_DEL_HOLD": "PENDING",
    "RUNNING": "RUNNING", "COMPLETING": "RUNNING", "SUSPENDED": "RUNNING", "RESIZING": "RUNNING",
    "STOPPED": "RUNNING", "SIGNALING": "RUNNING", "STAGE_OUT": "RUNNING",
    "COMPLETED": "COMPLETED",
    "CANCELLED": "CANCELLED",
    "FAILED": "FAILED", "TIMEOUT": "FAILED", "OUT_OF_MEMORY": "FAILED", "BOOT_FAIL": "FAILED",
    "DEADLINE": "FAILED", "NODE_FAIL": "FAILED", "PREEMPTED": "FAILED",
}
REQUEUEABLE = frozenset({"PREEMPTED", "NODE_FAIL"})
STDERR_TAIL_LINES = 40
SLURM_CMD_TIMEOUT_S = 60


class TprunTaskError(RuntimeError):
    """A rank of the job exited non-zero; the message has its exit code and the end of its stderr."""


class TprunTask(submitit.helpers.Checkpointable):
    """What every srun task runs. Checkpointable, with the default checkpoint(): the same call is
    requeued as it is, since the finished chunks are on disk and a rerun resumes from them."""

    def __init__(self, spec: JobSpec, max_requeues: int) -> None:
        self.spec = spec
        self.max_requeues = max_requeues

    def __call__(self, group: int | None = None) -> int:
        if group is not None:  # an array task of independent groups: the same number as SLURM_ARRAY_TASK_ID
            os.environ["TPRUN_GROUP_INDEX"] = str(group)
        # Until tprun's own handlers are in place, once its engine is up, nothing has been done yet: a stop
        # then means leave at once, for requeue. submitit would only log SIGTERM, and on its USR2 requeue
        # from rank 0 alone, bypassing the script's rules (cancel wins, max_requeues).
        for sig in STOP_SIGNALS:
            signal.signal(sig, _stop_before_start)
        from tprun.runner.job import run_job  # on the cluster: submitting needs no engine

        rc = run_job(self.spec, overwrite=False, quiet=True)
        # The verdict is in: a stop signal now must not turn it into another one.
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        if rc == EXIT_OK:
            return rc
        env = submitit.JobEnvironment()
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if rc == EXIT_REQUEUE and restarts < self.max_requeues:
            # SystemExit, not an exception: submitit then writes no result (the requeued run will), and
            # srun's exit code is 75, on which the batch script requeues the job.
            sys.exit(rc)
        raise TprunTaskError(_failure_message(env, rc, restarts))


def _stop_before_start(signum: int, frame: object) -> None:
    name = signal.Signals(signum).name
    print(f"tprun: {name} before the job started; exiting with {EXIT_REQUEUE} (requeue)", file=sys.stderr,
          flush=True)
    raise SystemExit(EXIT_REQUEUE)


def _failure_message(env, rc: int, restarts: int) -> str:
    why = {
        EXIT_FAILED: "this rank failed",
        EXIT_JOB_ERROR: "the job cannot run as specified; fix it rather than retry",
        EXIT_BAD_INPUT: "the input has bad lines (OUTPUT/errors.jsonl) and on_bad_input is fail",
        EXIT_PEER_FAILED: "another rank failed or hung; its own error says why",
        EXIT_REQUEUE: f"stopped for preemption, but the job was requeued {restarts} times already",
    }
    msg = f"tprun rank {env.global_rank} (job {env.job_id}) exited with {rc}"
    msg += f": {why[rc]}" if rc in why else " (see tprun/runner/exit_codes.py)"
    try:
        tail = Path(env.paths.stderr).read_text(errors="replace").splitlines()[-STDERR_TAIL_LINES:]
        msg += "; its stderr ends with:\n" + "\n".join(tail)
    except OSError:
        pass
    return msg


def submit_slurm(spec: JobSpec, folder: str | Path | None = None, **parameters) -> SlurmJob:
    """Submit `spec` as one Slurm job of tp * dp tasks. `folder` holds submitit's pickles and the
    per-task logs (default: OUTPUT.submitit/ next to the output directory); `parameters` go to
    submitit's SlurmExecutor.update_parameters and win over the spec."""
    spec.check()
    folder = private_folder(Path(folder) if folder else default_folder(spec.output))
    executor = submitit.SlurmExecutor(folder=folder / "%j", max_num_timeout=spec.slurm.max_requeues,
                                      python=_python(spec))
    executor.update_parameters(**{**executor_parameters(spec), **parameters})
    task = TprunTask(spec, spec.slurm.max_requeues)
    if spec.parallel.groups == "independent":
        # One array task per TP group (submitit submits a map_array as one Slurm array job).
        jobs = executor.map_array(task, range(spec.parallel.data_parallel_size))
        return SlurmArrayJob([SlurmJob(j, requeue=spec.slurm.requeue) for j in jobs], Path(spec.output))
    return SlurmJob(executor.submit(task), requeue=spec.slurm.requeue)


def default_folder(output: str) -> Path:
    """OUTPUT.submitit beside the output directory (absolute, so `--output .` has a name to extend)."""
    out = Path(os.path.abspath(output))
    if out.parent == out:
        raise ValueError(f"output {output!r} is the root directory; give submit a folder= for submitit's files")
    return out.with_name(out.name + ".submitit")


def private_folder(folder: Path) -> Path:
    """submitit's folder, created 0700 and refused if others could write to it: the compute nodes
    unpickle (run) what is in it, as the submitting user."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise PermissionError(f"cannot create submitit folder {folder}: {e.strerror}; choose an output whose "
                              "parent directory you can write, or pass folder= to tprun.submit") from None
    st = folder.stat()
    if st.st_uid != os.getuid():
        raise PermissionError(f"submitit folder {folder} belongs to uid {st.st_uid}, not you ({os.getuid()}): "
                              "its pickles run as you on the compute nodes; use a folder of your own")
    if st.st_mode & 0o022:
        raise PermissionError(
            f"submitit folder {folder} is group/world-writable (mode {stat.S_IMODE(st.st_mode):04o}): anyone "
            f"who can write there can plant a pickle that runs as you on the compute nodes; "
            f"chmod 700 {folder}, or use another folder")
    return folder


def executor_parameters(spec: JobSpec) -> dict:
    """The sbatch options of `tprun render slurm`, in submitit's terms."""
    res, slurm = spec.resources, spec.slurm
    params: dict = {
        "job_name": spec.name,
        "nodes": nodes_per_task(spec),
        "ntasks_per_node": res.processes_per_node,
        "cpus_per_task": res.cpus_per_proc,
        "time": slurm.time_minutes,
        # submitit sends its own signal (it is what its handler listens to); the lead time is ours.
        "signal_delay_s": slurm.signal_seconds,
        "setup": [*THREADS, *slurm.setup],
        "teardown": requeue_after_srun(slurm.max_requeues),
        "srun_args": [f"--cpus-per-task={res.cpus_per_proc}", *slurm.srun_args],
    }
    if res.gpus_per_node > 0:
        params["gpus_per_node"] = res.gpus_per_node
    if spec.parallel.groups == "independent":
        params["array_parallelism"] = spec.parallel.data_parallel_size
    # Options submitit does not model pass through as sbatch lines, as `tprun render slurm` writes them.
    passthrough = {"mem", "partition", "account", "qos", "constraint", "chdir", "requeue", "no-requeue"}
    extra: dict = {k.replace("-", "_"): (True if v is None else v)
                   for k, v in sbatch_options(spec) if k in passthrough}
    for key, value in extra_sbatch_options(spec):
        extra[key.replace("-", "_")] = True if value is None else value
    if extra:
        params["additional_parameters"] = extra
    return params


def _python(spec: JobSpec) -> str:
    # The tasks unpickle what this process pickled: by default the same interpreter runs them.
    if "python" not in spec.slurm.model_fields_set:
        return shlex.quote(sys.executable)
    python = spec.slurm.python
    return shlex.quote(os.path.abspath(python)) if "/" in python and not python.startswith("/") else python


class SlurmJob(JobHandle):
    """`job` is submitit's Job (per-rank results: `job.results()`). The state comes from sacct, so
    Slurm accounting must be on, as submitit itself needs."""

    def __init__(self, job, requeue: bool = True) -> None:
        self.job = job
        self.job_id = str(job.job_id)
        self.requeue = requeue

    def sacct_state(self) -> str:
        """sacct's State of the job's latest run ("" until the job is known to accounting)."""
        out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", self.job_id],
                             check=False, capture_output=True, text=True, timeout=SLURM_CMD_TIMEOUT_S).stdout
        states = [line.split("|")[1] for line in out.splitlines() if line.split("|")[0] == self.job_id]
        return states[-1].split()[0] if states else ""

    def status(self) -> JobState:
        raw = self.sacct_state()
        if not raw:
            # Not in accounting yet: squeue knows every job slurmctld holds.
            raw = subprocess.run(["squeue", "-h", "-j", self.job_id, "-o", "%T"], check=False,
                                 capture_output=True, text=True, timeout=SLURM_CMD_TIMEOUT_S).stdout.strip()
        if self.requeue and raw in REQUEUEABLE:
            return "PENDING"
        return SACCT_STATES.get(raw, "UNKNOWN")

    def cancel(self) -> None:
        subprocess.run(["scancel", self.job_id], check=True, capture_output=True, timeout=SLURM_CMD_TIMEOUT_S)

    def logs(self) -> str:
        """Every task's stdout and stderr, rank by rank (with a failed rank's traceback)."""
        parts = []
        for rank in range(self.job.num_tasks):
            task = self.job.task(rank)
            for name, text in (("stdout", task.stdout()), ("stderr", task.stderr())):
                if text:
                    parts.append(f"===== rank {rank} {name} =====\n{text}")
        return "\n".join(parts)


class SlurmArrayJob(JobHandle):
    """Independent groups: one array task per TP group. The job is done when the output directory holds
    `_SUCCESS`, whichever tasks got it there: a task that was cancelled or failed leaves its chunks to the
    others, so its own state decides only while no task is left to finish the job."""

    def __init__(self, tasks: list[SlurmJob], output: Path) -> None:
        self.tasks = tasks
        self.output = output
        self.job_id = tasks[0].job_id.split("_")[0]

    def status(self) -> JobState:
        states = [t.status() for t in self.tasks]
        if (self.output / "_SUCCESS").exists() and all(s in ("COMPLETED", "FAILED", "CANCELLED") for s in states):
            return "COMPLETED"
        for state in ("RUNNING", "PENDING", "UNKNOWN", "FAILED", "CANCELLED"):
            if state in states:
                return state  # type: ignore[return-value]
        return "COMPLETED"

    def cancel(self) -> None:
        subprocess.run(["scancel", self.job_id], check=True, capture_output=True, timeout=SLURM_CMD_TIMEOUT_S)

    def logs(self) -> str:
        return "\n".join(f"##### array task {i} #####\n{t.logs()}" for i, t in enumerate(self.tasks))
