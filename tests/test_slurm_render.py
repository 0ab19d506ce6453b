"""`tprun render slurm`: the sbatch script, pinned by golden files, and what submit asks submitit for.

Set TPRUN_UPDATE_GOLDEN=1 to rewrite tests/golden/slurm.sbatch after an intended change, then review
the diff. deploy/slurm.sbatch is kept equal to the render of examples/job.yaml.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tprun.cluster.slurm_render import render_sbatch
from tprun.config import JobSpec

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden" / "slurm.sbatch"

# Every option the render knows, on a DP=2 x TP=4 job over 2 nodes of 4 GPUs.
FULL_SPEC = {
    "name": "llama-70b-eval",
    "model": "/models/llama-70b",
    "input": "/data/prompts.jsonl",
    "output": "/scratch/out/eval",
    "parallel": {"tensor_parallel_size": 4, "data_parallel_size": 2},
    "resources": {"nodes": 2, "gpus_per_node": 4, "cpus_per_proc": 8, "memory": "480Gi"},
    "slurm": {
        "partition": "gpu", "account": "proj-42", "qos": "high", "time": "1-12:00:00",
        "constraint": "h100&ib", "chdir": "/scratch/runs",
        "extra_sbatch": ["--exclusive", "--mail-type=END,FAIL"],
        "setup": ["module load cuda/12.4", "source /opt/venvs/tprun/bin/activate"],
        "srun_args": ["--cpu-bind=cores"],
        "python": "python", "signal": "USR2@300", "max_requeues": 3,
    },
}


def test_render_of_every_option_matches_the_golden_file():
    text = render_sbatch(JobSpec.model_validate(FULL_SPEC), "/scratch/runs/eval.yaml")
    if os.environ.get("TPRUN_UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


def test_independent_groups_render_an_array_job_of_one_task_per_tp_group():
    data = {**FULL_SPEC, "parallel": {**FULL_SPEC["parallel"], "groups": "independent"}}
    text = render_sbatch(JobSpec.model_validate(data), "/scratch/runs/eval.yaml")
    golden = GOLDEN.with_name("slurm_groups.sbatch")
    if os.environ.get("TPRUN_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()
    lines = sbatch_lines(text)
    # 2 groups of TP=4 over 2 nodes of 4 GPUs: tasks 0 and 1, each one node of 4 srun tasks
    assert "#SBATCH --array=0-1" in lines and "#SBATCH --nodes=1" in lines
    assert "#SBATCH --ntasks-per-node=4" in lines
    assert "run /scratch/runs/eval.yaml --groups independent" in text
    subprocess.run(["bash", "-n"], input=text, text=True, timeout=10, check=True)
    with pytest.raises(ValueError, match=r"nodes\(3\) is not a multiple of dp\(2\)"):
        render_sbatch(spec(parallel={"data_parallel_size": 2, "tensor_parallel_size": 3, "groups": "independent"},
                           resources={"nodes": 3, "procs_per_node": 2}), "s.yaml")


def test_deploy_sbatch_is_the_render_of_the_example_spec():
    # Through the CLI, as a user would regenerate it (from the repository root).
    out = subprocess.run([sys.executable, "-m", "tprun", "render", "slurm", "examples/job.yaml"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, check=True).stdout
    assert out == (ROOT / "deploy" / "slurm.sbatch").read_text(), (
        "deploy/slurm.sbatch is stale: tprun render slurm examples/job.yaml > deploy/slurm.sbatch")


def test_rendered_scripts_are_valid_bash():
    for text in (render_sbatch(JobSpec.model_validate(FULL_SPEC), "x.yaml"),
                 (ROOT / "deploy" / "slurm.sbatch").read_text()):
        subprocess.run(["bash", "-n"], input=text, text=True, timeout=10, check=True)


def sbatch_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("#SBATCH ")]


def spec(**changes) -> JobSpec:
    data = {"model": "m", "input": "i.jsonl", "output": "o", **changes}
    return JobSpec.model_validate(data)


def test_one_task_per_process_and_gpus_only_when_asked():
    cpu = sbatch_lines(render_sbatch(spec(parallel={"tensor_parallel_size": 2},
                                          resources={"nodes": 2, "procs_per_node": 1}), "s.yaml"))
    assert "#SBATCH --nodes=2" in cpu and "#SBATCH --ntasks-per-node=1" in cpu
    assert not any("gpu" in line for line in cpu)
    gpu = sbatch_lines(render_sbatch(spec(parallel={"tensor_parallel_size": 8},
                                          resources={"nodes": 1, "gpus_per_node": 8}), "s.yaml"))
    assert "#SBATCH --ntasks-per-node=8" in gpu and "#SBATCH --gpus-per-node=8" in gpu


def test_resources_that_do_not_give_tp_times_dp_processes_are_refused():
    bad = spec(parallel={"tensor_parallel_size": 2, "data_parallel_size": 2}, resources={"nodes": 3})
    with pytest.raises(ValueError, match=r"resources give 3 processes.*tp\(2\) \* dp\(2\) = 4"):
        render_sbatch(bad, "s.yaml")


@pytest.mark.parametrize(("memory", "flag"), [("64G", "64G"), ("64Gi", "64G"), ("512Mi", "512M"),
                                              ("2000", "2000")])
def test_memory_is_written_in_slurm_units(memory, flag):
    assert f"#SBATCH --mem={flag}" in sbatch_lines(render_sbatch(spec(resources={"memory": memory}), "s"))


def test_memory_slurm_cannot_read_is_a_clear_error():
    with pytest.raises(ValueError, match=r"resources.memory '64 GB' is not a memory size Slurm accepts"):
        render_sbatch(spec(resources={"memory": "64 GB"}), "s.yaml")


@pytest.mark.parametrize(("field", "value", "message"), [
    ("time", "one hour", "not a Slurm time limit"),
    ("signal", "HUP@60", "USR1, USR2, TERM, INT"),
    ("extra_sbatch", ["exclusive"], "write each as its own item '--name' or '--name=value'"),
])
def test_bad_slurm_options_name_the_field_and_the_fix(field, value, message):
    with pytest.raises(ValueError, match=message) as err:
        spec(slurm={field: value})
    assert f"slurm.{field}" in str(err.value)


# The requeue decision is the script's own logic: exercised with fakes of srun and scontrol (the
# real ones are exercised in test_slurm_cluster.py).
FAKE_SRUN = "#!/bin/sh\necho \"srun $*\" >> \"$LOG\"\nexit \"$SRUN_EXIT\"\n"
FAKE_SCONTROL = "#!/bin/sh\necho \"scontrol $*\" >> \"$LOG\"\n"
FAKE_SQUEUE = "#!/bin/sh\necho \"$JOB_STATE\"\n"


@pytest.mark.parametrize(("srun_exit", "restarts", "state", "requeued", "script_exit"), [
    (0, 0, "RUNNING", False, 0),
    (75, 0, "RUNNING", True, 0),  # stopped by the time-limit signal: requeue, this run ends cleanly
    (75, 4, "RUNNING", True, 0),
    (75, 5, "RUNNING", False, 75),  # max_requeues (5) reached: the stop shows as the job's exit code
    (75, 0, "COMPLETING", False, 75),  # scancel: the cancel wins
    (1, 0, "RUNNING", False, 1),  # a failure is not retried
    (76, 0, "RUNNING", False, 76),
])
def test_script_requeues_a_stopped_job_up_to_max_requeues(tmp_path, srun_exit, restarts, state, requeued,
                                                          script_exit):
    for name, body in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("squeue", FAKE_SQUEUE)):
        (tmp_path / name).write_text(body)
        (tmp_path / name).chmod(stat.S_IRWXU)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "LOG": str(tmp_path / "log"), "SRUN_EXIT": str(srun_exit),
           "SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": str(restarts), "SLURM_CPUS_PER_TASK": "1",
           "JOB_STATE": state}
    script = tmp_path / "job.sbatch"
    script.write_text((ROOT / "deploy" / "slurm.sbatch").read_text())
    rc = subprocess.run(["bash", str(script), "--output", "out/x"], check=False, env=env,
                        timeout=30).returncode
    log = (tmp_path / "log").read_text().splitlines()
    assert log[0] == "srun --cpus-per-task=1 python3 -m tprun run examples/job.yaml --output out/x"
    assert (log[1:] == ["scontrol requeue 4242"]) is requeued
    assert rc == script_exit


def test_submit_asks_slurm_for_what_render_writes(tmp_path):
    """submitit builds its own sbatch file; it must carry the render's resources and options."""
    from submitit.slurm.slurm import _make_sbatch_string

    from tprun.cluster.slurm_submit import executor_parameters

    full = JobSpec.model_validate(FULL_SPEC)
    ours = set(sbatch_lines(render_sbatch(full, "s.yaml")))
    theirs_text = _make_sbatch_string(command="true", folder=tmp_path, **executor_parameters(full))
    theirs = set(sbatch_lines(theirs_text))
    # submitit writes --time in minutes and its own preemption signal (USR2 unless
    # SUBMITIT_PREEMPT_SIGNAL), with our lead time.
    ours -= {"#SBATCH --time=1-12:00:00", "#SBATCH --signal=USR2@300"}
    assert "#SBATCH --time=2160" in theirs and "#SBATCH --signal=USR2@300" in theirs
    assert ours <= theirs, f"missing from submitit's script: {sorted(ours - theirs)}"
    assert "--cpu-bind=cores" in theirs_text and "module load cuda/12.4" in theirs_text


def test_submit_of_independent_groups_asks_for_an_array_of_one_group_each(tmp_path):
    from submitit.slurm.slurm import _make_sbatch_string

    from tprun.cluster.slurm_submit import executor_parameters

    data = {**FULL_SPEC, "parallel": {**FULL_SPEC["parallel"], "groups": "independent"}}
    params = executor_parameters(JobSpec.model_validate(data))
    # submitit writes the --array line itself for a map_array; 2 tasks, at most 2 running at once
    text = _make_sbatch_string(command="true", folder=tmp_path, map_count=2, **params)
    lines = set(sbatch_lines(text))
    assert {"#SBATCH --array=0-1%2", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=4"} <= lines


def test_cli_groups_flag_overrides_the_spec_for_render():
    out = subprocess.run([sys.executable, "-m", "tprun", "render", "slurm", "examples/job.yaml", "--groups",
                          "independent"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True).stdout
    # examples/job.yaml: TP=2 over 2 nodes, dp 1: an array of one group, which the tasks are told too
    assert "#SBATCH --array=0-0" in out and "#SBATCH --nodes=2" in out
    assert "run examples/job.yaml --groups independent" in out
