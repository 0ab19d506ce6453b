"""`tprun render slurm SPEC`: the sbatch script of a JobSpec.

One srun task per process (`--nodes` x `--ntasks-per-node` = tp * dp); every task runs `tprun run SPEC`
and reads its rank from Slurm (launchers/slurm.py). Preemption: `--signal` reaches every task before the
time limit, tprun finishes the chunk in flight and exits 75, and the script requeues the job, which
resumes where it stopped; `--requeue` also lets Slurm requeue it on preemption or node failure.

Independent groups (`parallel.groups: independent`): an array job, `--array=0-(dp-1)`, one array task per
TP group on nodes/dp nodes, each its own srun of tp tasks and its own world. Slurm starts each task when
its nodes are free and requeues or fails it alone; the tasks share only the output directory, where they
claim chunks by lease (runner/leases.py), so a task that is cancelled or lost leaves its chunk to the
others once its lease expires.

No `--kill-on-bad-exit`: on a preemption signal every rank exits 75 on its own schedule (after its TP
group's chunk), and killing the others at the first exit would throw their chunks away. A rank that
fails is covered by tprun's watchdog, which stops the others within a minute.
"""

from __future__ import annotations

import re
import shlex

from tprun.cluster.spec_rules import no_control, split_option
from tprun.config import JobSpec
from tprun.runner.exit_codes import EXIT_REQUEUE

# torch starts one thread per core of the node in every task, so tasks sharing a node oversubscribe it
# (torchrun sets 1; Slurm sets nothing). A value the user exported wins.
THREADS = [
    "# One compute thread per CPU Slurm gave the task (torch would take every core of the node).",
    'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"',
]


def slurm_memory(memory: str) -> str:
    """A Resources.memory value as sbatch --mem takes it: Kubernetes' binary suffixes (Gi) become
    Slurm's (G, also binary); plain numbers are megabytes to Slurm."""
    m = re.fullmatch(r"(\d+)([KMGT])?(i)?", memory.strip())
    if not m:
        raise ValueError(
            f"resources.memory {memory!r} is not a memory size Slurm accepts; use e.g. 64G or 64Gi"
        )
    return m.group(1) + (m.group(2) or "")


def sbatch_options(spec: JobSpec) -> list[tuple[str, str | None]]:
    """(option, value) pairs in the order the script lists them; value None is a bare flag."""
    res, slurm = spec.resources, spec.slurm
    opts: list[tuple[str, str | None]] = [("job-name", spec.name)]
    if spec.parallel.groups == "independent":
        opts.append(("array", f"0-{spec.parallel.data_parallel_size - 1}"))
    opts += [
        ("nodes", str(nodes_per_task(spec))),
        ("ntasks-per-node", str(res.processes_per_node)),
        ("cpus-per-task", str(res.cpus_per_proc)),
    ]
    if res.gpus_per_node > 0:
        opts.append(("gpus-per-node", str(res.gpus_per_node)))
    if res.memory:
        opts.append(("mem", slurm_memory(res.memory)))
    opts.append(("time", slurm.time))
    for key in ("partition", "account", "qos", "constraint", "chdir"):
        if getattr(slurm, key):
            opts.append((key, getattr(slurm, key)))
    opts.append(("signal", slurm.signal))
    opts.append(("requeue" if slurm.requeue else "no-requeue", None))
    # A requeued job writes to the same log: append, so the earlier runs' output stays readable.
    opts.append(("open-mode", "append"))
    return opts


def nodes_per_task(spec: JobSpec) -> int:
    """Nodes of one allocation: all of them, or with independent groups one TP group's share."""
    nodes, dp = spec.resources.nodes, spec.parallel.data_parallel_size
    if spec.parallel.groups == "one-world":
        return nodes
    if nodes % dp:
        raise ValueError(
            f"independent groups run one array task per TP group on resources.nodes / dp nodes, but "
            f"nodes({nodes}) is not a multiple of dp({dp}); set resources.nodes to a multiple of dp and "
            "resources.procs_per_node so that each group's nodes hold its tp processes")
    return nodes // dp


def extra_sbatch_options(spec: JobSpec) -> list[tuple[str, str | None]]:
    """spec.slurm.extra_sbatch as (option, value) pairs; each item is one option (config.py refuses others)."""
    return [split_option(opt) for opt in spec.slurm.extra_sbatch]


def sbatch_line(key: str, value: str | None) -> str:
    return f"#SBATCH --{key}" if value is None else f"#SBATCH --{key}={shlex.quote(value)}"


def render_sbatch(spec: JobSpec, spec_path: str) -> str:
    # The spec is text from a file: validated again here, whoever built it, before any of it is written.
    spec.check()
    try:
        no_control(spec_path)
    except ValueError as e:
        raise ValueError(f"the job spec's path: {e}") from None
    res, slurm, par = spec.resources, spec.slurm, spec.parallel
    independent = par.groups == "independent"
    shape = (f"{par.data_parallel_size} array task(s), one per TP group, each {nodes_per_task(spec)} node(s) x "
             f"{res.processes_per_node} task(s), TP={par.tensor_parallel_size}; the groups share only the output."
             if independent else f"{res.nodes} node(s) x {res.processes_per_node} task(s), "
             f"TP={par.tensor_parallel_size} x DP={par.data_parallel_size}.")
    lines = [
        "#!/bin/bash",
        f"# tprun job {spec.name}: {shape}",
        f"# Rendered by `tprun render slurm {spec_path}`; change the spec and render again rather than",
        "# editing this file. Submit from the directory the spec's relative paths start in, with tprun's",
        "# Python environment active (sbatch hands the environment on to the tasks):",
        "#   sbatch THIS_FILE [tprun run flags, e.g. --output out/other]",
    ]
    lines += [sbatch_line(key, value) for key, value in sbatch_options(spec) + extra_sbatch_options(spec)]
    lines += ["", "set -u", *THREADS]
    if slurm.setup:
        lines += ["", *slurm.setup]
    srun = ["srun", f"--cpus-per-task={res.cpus_per_proc}", *slurm.srun_args]
    # Said again on the command line: the spec file may not say it (`tprun render --groups independent`).
    run = [*shlex.split(slurm.python), "-m", "tprun", "run", spec_path, *(["--groups", "independent"] if independent else [])]
    if independent:
        lines += ["", "# This array task is TP group SLURM_ARRAY_TASK_ID: a world of its own tp tasks."]
    lines += [
        "",
        "# One task per process; each reads its rank from SLURM_PROCID. srun of Slurm 22.05-23.02 does not",
        "# inherit --cpus-per-task from the job, hence it is repeated here.",
        " ".join(shlex.quote(a) for a in srun + run) + ' "$@"',
        *requeue_after_srun(slurm.max_requeues),
        "",
    ]
    return "\n".join(lines)


def requeue_after_srun(max_requeues: int) -> list[str]:
    """The batch script's lines right after srun: the one place a stopped job is requeued, in this script
    and in submitit's (as its teardown). The script decides rather than a task, because a task may not get
    to: a second stop signal makes tprun leave at once (os._exit), and a signal before tprun's handlers are
    in place ends the task with the same exit code."""
    return [
        "rc=$?",
        f"# {EXIT_REQUEUE}: stopped by --signal before every chunk was done. Requeued, the job restarts with",
        "# the same id and output directory and skips the chunks already written. A job that is not RUNNING",
        "# any more was cancelled, or preempted and requeued by Slurm itself: left alone.",
        f'if [ "$rc" -eq {EXIT_REQUEUE} ] && [ "${{SLURM_RESTART_COUNT:-0}}" -lt {max_requeues} ] &&',
        '   [ "$(squeue -h -j "$SLURM_JOB_ID" -o %T)" = RUNNING ]; then',
        '  scontrol requeue "$SLURM_JOB_ID" && exit 0',
        "fi",
        'exit "$rc"',
    ]
