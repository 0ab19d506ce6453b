"""Independent groups on the real 2-node Slurm of scripts/slurm-up.sh: an array job of 2 TP=1 groups.

The array task of each group starts when its node is free and fails alone; the two share only the
output directory. Skipped (with the reason) when no cluster answers, like test_slurm_cluster.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.test_slurm_cluster import (
    EXAMPLE,
    JOB_TIMEOUT_S,
    ROOT,
    _cluster_problem,
    run,
    sacct,
    venv_env,
)
from tprun.config import JobSpec

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.timeout(900),
    pytest.mark.skipif(_cluster_problem() is not None, reason=str(_cluster_problem())),
]
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}
N = 48


def spec_data(tmp: Path, model: Path, out: Path) -> dict:
    data = yaml.safe_load(EXAMPLE.read_text())
    data.update(model=str(model), input=str(tmp / "prompts.jsonl"), output=str(out), chunk_size=4,
                lease_timeout_s=10, name="tprun-groups")
    data["parallel"] = {"tensor_parallel_size": 1, "data_parallel_size": 2, "groups": "independent"}
    data["sampling"] = {"temperature": 0.0, "max_tokens": 24, "ignore_eos": True}
    data["engine"] = {"max_num_seqs": 2}  # a few requests at a time: the job lasts long enough to cancel a task
    return data


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slurm-groups")
    model = tmp / "demo-model"
    run([sys.executable, "-m", "tprun", "demo-model", str(model)], timeout=120)
    (tmp / "prompts.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Story number {i}:"}) + "\n"
                                               for i in range(N)))
    ref = tmp / "one-process"
    spec = tmp / "ref.yaml"
    spec.write_text(yaml.safe_dump({**spec_data(tmp, model, ref), "parallel": {"tensor_parallel_size": 1}}))
    run([sys.executable, "-m", "tprun", "run", str(spec), "--quiet"], timeout=300, cwd=ROOT, env=venv_env())
    return {"tmp": tmp, "model": model, "reference": (ref / "results.jsonl").read_text()}


def array_states(array_id: str) -> dict[str, str]:
    out = run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", array_id], timeout=30).stdout
    return {row.split("|")[0]: row.split("|")[1].split(" ")[0] for row in out.splitlines() if "_" in row}


def test_array_job_completes_through_one_task_when_the_other_is_cancelled(job):
    from tprun.cluster.slurm_render import render_sbatch

    out = job["tmp"] / "array-out"
    spec_path = job["tmp"] / "array.yaml"
    spec_path.write_text(yaml.safe_dump(spec_data(job["tmp"], job["model"], out)))
    script = job["tmp"] / "array.sbatch"
    script.write_text(render_sbatch(JobSpec.from_yaml(spec_path), str(spec_path)))
    assert "#SBATCH --array=0-1" in script.read_text()
    log = job["tmp"] / "array-%A_%a.out"
    array_id = run(["sbatch", "--parsable", f"--output={log}", str(script)], cwd=ROOT, env=venv_env()).stdout.strip()
    try:
        # Cancel task 1 once it has done some of the work.
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not any(json.loads(p.read_text()).get("group") == 1 for p in (out / "parts").glob("*.done")):
            assert time.monotonic() < deadline, f"task 1 wrote no chunk; states {array_states(array_id)}"
            time.sleep(0.5)
        run(["scancel", f"{array_id}_1"], timeout=30)
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while (states := array_states(array_id)).keys() != {f"{array_id}_0", f"{array_id}_1"} or \
                not set(states.values()) <= FINAL:
            assert time.monotonic() < deadline, f"array {array_id} not done: {states}"
            time.sleep(1)
    finally:
        subprocess.run(["scancel", array_id], timeout=30, check=False)
    logs = {i: Path(str(log).replace("%A", array_id).replace("%a", str(i))).read_text() for i in (0, 1)}
    assert states == {f"{array_id}_0": "COMPLETED", f"{array_id}_1": "CANCELLED"}, logs
    assert (out / "_SUCCESS").exists()
    assert (out / "results.jsonl").read_text() == job["reference"]
    groups = {g["group"]: g["chunks"] for g in json.loads((out / "summary.json").read_text())["groups"]}
    assert groups.get(0, 0) > 0 and groups.get(1, 0) > 0 and sum(groups.values()) == N // 4


def test_tprun_submit_slurm_of_independent_groups_is_an_array_whose_status_aggregates(job):
    from tprun.submit import submit

    out = job["tmp"] / "submit-out"
    handle = submit(JobSpec.model_validate(spec_data(job["tmp"], job["model"], out)), backend="slurm",
                    folder=job["tmp"] / "submit-logs")
    try:
        assert handle.wait(timeout=JOB_TIMEOUT_S, poll_s=1) == "COMPLETED", handle.logs()
    finally:
        subprocess.run(["scancel", handle.job_id], timeout=30, check=False)
    assert [t.job_id for t in handle.tasks] == [f"{handle.job_id}_0", f"{handle.job_id}_1"]
    assert sacct(f"{handle.job_id}_0").startswith("COMPLETED")
    assert (out / "results.jsonl").read_text() == job["reference"]
