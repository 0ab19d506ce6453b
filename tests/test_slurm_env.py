"""Slurm environments -> DistributedArgs.

The snapshots under tests/data/slurm_env/ are the environments of real processes (batch script, srun
tasks, salloc and `srun --pty` shells) captured on the Slurm that scripts/slurm-up.sh starts; each
file's first line says which command produced it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tprun.launchers import detect_launcher, distributed_args
from tprun.launchers.base import LauncherError
from tprun.launchers.hostlist import expand_counts, expand_hostlist
from tprun.launchers.slurm import SlurmLauncher

SNAPSHOTS = Path(__file__).parent / "data" / "slurm_env"


def snapshot(name: str) -> dict[str, str]:
    lines = (SNAPSHOTS / f"{name}.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


# snapshot -> (rank, local_rank, world_size, local_world_size, master_addr)
TASKS = {
    "sbatch_2nodes_2tasks_per_node_gpu/rank0": (0, 0, 4, 2, "slurm-node01"),
    "sbatch_2nodes_2tasks_per_node_gpu/rank1": (1, 1, 4, 2, "slurm-node01"),
    "sbatch_2nodes_2tasks_per_node_gpu/rank2": (2, 0, 4, 2, "slurm-node01"),
    "sbatch_2nodes_2tasks_per_node_gpu/rank3": (3, 1, 4, 2, "slurm-node01"),
    # uneven: SLURM_TASKS_PER_NODE=2,1 -> the second node runs one task
    "sbatch_3tasks_on_2nodes/rank0": (0, 0, 3, 2, "slurm-node01"),
    "sbatch_3tasks_on_2nodes/rank1": (1, 1, 3, 2, "slurm-node01"),
    "sbatch_3tasks_on_2nodes/rank2": (2, 0, 3, 1, "slurm-node01"),
    "sbatch_2nodes_1task_per_node/rank0": (0, 0, 2, 1, "slurm-node01"),
    "sbatch_2nodes_1task_per_node/rank1": (1, 0, 2, 1, "slurm-node01"),
    # a step inside salloc sees the step's task count, not the allocation's SLURM_NTASKS=4
    "salloc_srun_1task/rank0": (0, 0, 1, 1, "slurm-node01"),
    # a step on the second node of a two-node allocation: its rank 0 runs there, although
    # SLURM_JOB_NODELIST starts with slurm-node01
    "salloc_srun_on_second_node/rank0": (0, 0, 2, 2, "slurm-node02"),
    "salloc_srun_on_second_node/rank1": (1, 1, 2, 2, "slurm-node02"),
    "salloc_srun_cyclic/rank0": (0, 0, 2, 1, "slurm-node01"),
    "salloc_srun_cyclic/rank1": (1, 0, 2, 1, "slurm-node01"),
    # a pty step of several tasks is a real step (as is an srun nested in a pty shell)
    "srun_pty_2tasks/rank0": (0, 0, 2, 1, "slurm-node01"),
    "srun_pty_2tasks/rank1": (1, 0, 2, 1, "slurm-node01"),
}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_srun_task_env_gives_its_rank_and_world(name):
    rank, local_rank, world, local_world, master = TASKS[name]
    args = distributed_args(snapshot(name))
    assert args.launcher == "slurm"
    assert (args.rank, args.local_rank, args.world_size, args.local_world_size, args.master_addr) == (
        rank, local_rank, world, local_world, master,
    )


@pytest.mark.parametrize("job", ["sbatch_2nodes_2tasks_per_node_gpu", "sbatch_3tasks_on_2nodes",
                                 "salloc_srun_on_second_node", "srun_pty_2tasks"])
def test_all_tasks_of_a_step_agree_on_the_rendezvous(job):
    args = [distributed_args(snapshot(p.with_suffix("").relative_to(SNAPSHOTS).as_posix()))
            for p in sorted((SNAPSHOTS / job).glob("rank*.env"))]
    assert len({(a.master_addr, a.master_port, a.world_size) for a in args}) == 1
    assert sorted(a.rank for a in args) == list(range(args[0].world_size))


@pytest.mark.parametrize("name", [
    "sbatch_2nodes_2tasks_per_node_gpu/batch",  # SLURM_PROCID=0 and SLURM_NTASKS=4, but no step
    "sbatch_3tasks_on_2nodes/batch",
    "salloc_shell/shell",  # SLURM_NTASKS=4 of the allocation, no SLURM_PROCID
    "srun_pty_shell/shell",  # srun --pty bash: an interactive shell, not a task of a job
])
def test_batch_script_and_interactive_shells_are_single_local_processes(name):
    env = snapshot(name)
    assert env.get("SLURM_JOB_ID")  # they are inside an allocation...
    args = distributed_args(env)
    assert (args.launcher, args.rank, args.world_size) == ("local", 0, 1)  # ...but not job tasks


def test_master_port_is_derived_from_the_job_and_step_id():
    base = snapshot("sbatch_2nodes_1task_per_node/rank0")
    port = SlurmLauncher(base).master_port

    def port_of(**changes: str) -> int:
        return SlurmLauncher({**base, **changes}).master_port

    # Outside Linux's ephemeral port range, so no outgoing connection can hold it.
    assert 1024 < port < 32768
    assert port_of() == port  # deterministic: a requeued job (same id) gets the same port
    other_jobs = {port_of(SLURM_JOB_ID=str(int(base["SLURM_JOB_ID"]) + i)) for i in range(1, 200)}
    assert port not in other_jobs and len(other_jobs) == 199  # neighbouring jobs never collide
    steps = {port_of(SLURM_STEP_ID=str(s), SLURM_STEPID=str(s)) for s in range(16)}
    assert len(steps) == 16  # concurrent steps of one job each get their own port


def test_explicit_master_port_and_addr_win_over_derived_ones():
    env = {**snapshot("sbatch_2nodes_1task_per_node/rank1"),
           "MASTER_PORT": "23456", "MASTER_ADDR": "10.1.2.3"}
    args = distributed_args(env)
    assert (args.launcher, args.master_port, args.master_addr, args.rank) == ("slurm", 23456, "10.1.2.3", 1)


def test_torchrun_inside_a_slurm_step_wins():
    env = {**snapshot("salloc_srun_1task/rank0"), "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4",
           "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "slurm-node01", "MASTER_PORT": "29400"}
    args = distributed_args(env)
    assert (args.launcher, args.rank, args.world_size) == ("torchrun", 3, 4)


def test_older_slurm_with_only_SLURM_STEPID_is_a_task():
    env = snapshot("sbatch_2nodes_1task_per_node/rank1")
    del env["SLURM_STEP_ID"]
    assert detect_launcher(env).name == "slurm"
    assert distributed_args(env).rank == 1


def test_job_level_tasks_per_node_is_used_when_the_step_variables_are_absent():
    env = snapshot("sbatch_3tasks_on_2nodes/rank2")
    del env["SLURM_STEP_TASKS_PER_NODE"]
    assert distributed_args(env).local_world_size == 1
    del env["SLURM_TASKS_PER_NODE"]
    env["SLURM_NTASKS_PER_NODE"] = "2"
    assert distributed_args(env).local_world_size == 2


def test_rank_outside_the_world_is_a_clear_error():
    env = {**snapshot("sbatch_2nodes_1task_per_node/rank1"), "SLURM_NTASKS": "1"}
    with pytest.raises(LauncherError, match=r"rank 1 is outside the world of 1"):
        distributed_args(env)


def test_malformed_node_list_names_the_variable():
    env = {**snapshot("sbatch_2nodes_1task_per_node/rank0"), "SLURM_STEP_NODELIST": "gpu-[001-"}
    with pytest.raises(LauncherError, match=r"SLURM_STEP_NODELIST.*never closed"):
        distributed_args(env)


def test_non_numeric_job_id_asks_for_MASTER_PORT():
    env = {**snapshot("sbatch_2nodes_1task_per_node/rank0"), "SLURM_JOB_ID": "abc"}
    with pytest.raises(LauncherError, match="set MASTER_PORT"):
        distributed_args(env)


# Expansions checked against `scontrol show hostnames` of Slurm 22.05.
HOSTLISTS = {
    "gpu-[007-009,012]": ["gpu-007", "gpu-008", "gpu-009", "gpu-012"],
    "a1,b[2-3]": ["a1", "b2", "b3"],
    "rack[1-2]-n[01-02]": ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"],
    "n[8-10]": ["n8", "n9", "n10"],
    "n[08-10]": ["n08", "n09", "n10"],
    "n[098-101]": ["n098", "n099", "n100", "n101"],
    "node1": ["node1"],
    "a[1,3],b,c[5-6]": ["a1", "a3", "b", "c5", "c6"],
    "10.0.0.[1-2]": ["10.0.0.1", "10.0.0.2"],
}


@pytest.mark.parametrize("expr", sorted(HOSTLISTS))
def test_hostlist_expands_like_scontrol(expr):
    assert expand_hostlist(expr) == HOSTLISTS[expr]


@pytest.mark.parametrize(("expr", "problem"), [
    ("gpu-[001-", "never closed"),
    ("gpu-001]", "without '\\['"),
    ("gpu-[1-[2]]", "nested"),
    ("gpu-[5-3]", "runs backwards"),
    ("gpu-[a-c]", "not a number or range"),
    ("gpu-[]", "not a number or range"),
    (",", "names no host"),
])
def test_malformed_hostlist_is_a_clear_error(expr, problem):
    with pytest.raises(LauncherError, match=problem):
        expand_hostlist(expr)


@pytest.mark.parametrize(("expr", "counts"), [
    ("2(x3),1", [2, 2, 2, 1]),
    ("4", [4]),
    ("1(x2)", [1, 1]),
    ("3,1", [3, 1]),
])
def test_tasks_per_node_lists_expand(expr, counts):
    assert expand_counts(expr) == counts


def test_malformed_tasks_per_node_is_a_clear_error():
    with pytest.raises(LauncherError, match="not N or N\\(xM\\)"):
        expand_counts("2(3)")
