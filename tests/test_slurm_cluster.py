"""Real Slurm: the jobs a user submits, on the 2-node cluster of scripts/slurm-up.sh.

Each node is a network namespace with its own hostname and IP, so TP=2 over 2 nodes really
rendezvous over the network. Skipped (with the reason) when no cluster answers.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tprun.config import JobSpec, SamplingParams
from tprun.launchers.hostlist import expand_hostlist

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "job.yaml"
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}
JOB_TIMEOUT_S = 240


def _cluster_problem() -> str | None:
    if not shutil.which("sinfo"):
        return "no Slurm client (sinfo); start a cluster with `sudo bash scripts/slurm-up.sh`"
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True,
                             timeout=10, check=True).stdout
    except (subprocess.SubprocessError, OSError) as e:
        return f"no Slurm cluster answers ({e}); start one with `sudo bash scripts/slurm-up.sh`"
    # Busy nodes are fine (a previous job may still be completing); down or drained ones are not.
    usable = {line.split()[0] for line in out.splitlines()
              if line.split()[1].rstrip("*~#!%$@^-").lower() in ("idle", "mixed", "allocated", "completing")}
    if len(usable) < 2:
        return f"the Slurm cluster has {len(usable)} usable node(s), these tests need 2: {out.strip()!r}"
    return None


pytestmark = [
    pytest.mark.slurm,
    pytest.mark.timeout(600),
    pytest.mark.skipif(_cluster_problem() is not None, reason=str(_cluster_problem())),
]


def venv_env() -> dict[str, str]:
    """The tasks run `python3 -m tprun`: sbatch hands them this environment, venv first on PATH."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "HF_HUB_OFFLINE": "1"}


def run(cmd: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True, **kw)


def sacct(job_id: str, fields: str = "State") -> str:
    out = run(["sacct", "-X", "-n", "-P", "-o", f"JobID,{fields}", "-j", job_id], timeout=30).stdout
    rows = [line.split("|", 1)[1] for line in out.splitlines() if line.split("|")[0] == job_id]
    return rows[-1] if rows else ""


def wait_job(job_id: str, log: Path | None = None, timeout: float = JOB_TIMEOUT_S) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = sacct(job_id).split(" ")[0]
        if state in FINAL:
            return state
        time.sleep(1)
    subprocess.run(["scancel", job_id], timeout=30, check=False)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    pytest.fail(f"job {job_id} not done after {timeout} s (cancelled); log:\n{tail}")


def records(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo model, and the reference: the example job under torchrun (TP=2, one host)."""
    tmp = tmp_path_factory.mktemp("slurm")
    model = tmp / "demo-model"
    run([sys.executable, "-m", "tprun", "demo-model", str(model)], timeout=120)
    ref = tmp / "torchrun-out"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
         "-m", "tprun", "run", str(EXAMPLE), "--model", str(model), "--output", str(ref), "--quiet"],
        timeout=300, cwd=ROOT, env=venv_env())
    assert len(records(ref)) == len((ROOT / "examples" / "prompts.jsonl").read_text().splitlines())
    return {"tmp": tmp, "model": model, "reference": records(ref)}


def test_srun_tasks_see_their_slurm_ranks_on_two_hosts():
    probe = f'echo "$(hostname) $({sys.executable} -m tprun env --json)"'
    out = run(["srun", "-N2", "--ntasks-per-node=1", "sh", "-c", probe], timeout=120, cwd=ROOT,
              env=venv_env()).stdout
    tasks = sorted(({"host": line.split(" ", 1)[0], **json.loads(line.split(" ", 1)[1])}
                    for line in out.splitlines()), key=lambda t: t["rank"])
    assert [(t["launcher"], t["rank"], t["world_size"]) for t in tasks] == [("slurm", 0, 2), ("slurm", 1, 2)]
    assert tasks[0]["host"] != tasks[1]["host"]
    # every rank finds rank 0's host and the same port
    rendezvous = {(t["master_addr"], t["master_port"]) for t in tasks}
    assert rendezvous == {(tasks[0]["host"], tasks[0]["master_port"])}


def test_sbatch_deploy_script_tp2_across_two_nodes_matches_torchrun(demo):
    out, log = demo["tmp"] / "sbatch-out", demo["tmp"] / "sbatch-%j.out"
    # Exactly what a user runs, from the repository root; the flags after the script go to tprun run.
    job_id = run(["sbatch", "--parsable", f"--output={log}", "deploy/slurm.sbatch",
                  "--model", str(demo["model"]), "--output", str(out)],
                 cwd=ROOT, env=venv_env()).stdout.strip()
    log = Path(str(log).replace("%j", job_id))
    assert wait_job(job_id, log) == "COMPLETED", log.read_text()[-3000:]
    # slurmdbd can hold a partial node list for a moment after the state turns final (seen once in CI).
    deadline = time.monotonic() + 20
    while (nodes := expand_hostlist(sacct(job_id, "NodeList"))) != ["slurm-node01", "slurm-node02"]:
        assert time.monotonic() < deadline, f"job ran on {nodes}, not on both nodes"
        time.sleep(1)
    assert records(out) == demo["reference"]
    assert (out / "_SUCCESS").exists()


def test_tprun_submit_slurm_through_submitit_matches_torchrun(demo):
    out = demo["tmp"] / "submit-out"
    spec = yaml.safe_load(EXAMPLE.read_text())
    spec.update(model=str(demo["model"]), input=str(ROOT / "examples" / "prompts.jsonl"), output=str(out))
    spec_path = demo["tmp"] / "submit.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    proc = subprocess.run([sys.executable, "-m", "tprun", "submit", "slurm", str(spec_path), "--wait",
                           "--timeout", str(JOB_TIMEOUT_S)], capture_output=True, text=True,
                          timeout=JOB_TIMEOUT_S + 60, cwd=demo["tmp"], env=venv_env(), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = proc.stdout.split("submitted slurm job ")[1].split()[0]
    assert f"job {job_id}: COMPLETED" in proc.stdout
    assert records(out) == demo["reference"]
    # submitit kept one log per rank, next to the output directory
    logs = sorted(p.name for p in (demo["tmp"] / "submit-out.submitit" / job_id).glob("*_log.err"))
    assert logs == [f"{job_id}_0_log.err", f"{job_id}_1_log.err"]


def test_submit_handle_status_and_cancel_of_a_running_job(demo):
    from tprun.submit import submit

    # Long enough (many prompts, no early stop) to still be running when it is cancelled.
    prompts = demo["tmp"] / "many.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": f"Story number {i}:"}) + "\n"
                               for i in range(64)))
    spec = JobSpec.from_yaml(EXAMPLE).model_copy(update={
        "model": str(demo["model"]), "input": str(prompts), "output": str(demo["tmp"] / "cancel-out"),
        "sampling": SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True), "chunk_size": 4,
        # One request at a time: the engine's continuous batching would otherwise finish all 64 at once.
        "engine": {"max_num_seqs": 1},
    })
    handle = submit(spec, backend="slurm", folder=demo["tmp"] / "cancel-logs")
    try:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while (state := handle.status()) != "RUNNING":
            assert state == "PENDING" and time.monotonic() < deadline, f"{state}: {handle.logs()}"
            time.sleep(0.5)
        handle.cancel()
        assert handle.wait(timeout=120, poll_s=1) == "CANCELLED"
    finally:
        subprocess.run(["scancel", handle.job_id], timeout=30, check=False)
    # Every task ends (tprun exits on SIGTERM; Slurm's SIGKILL follows KillWait later) and the job leaves
    # the queue, without writing a result as if it had finished.
    deadline = time.monotonic() + 60
    while run(["squeue", "-h", "-j", handle.job_id], timeout=30).stdout.strip():
        assert time.monotonic() < deadline, "the cancelled job's tasks still run after 60 s"
        time.sleep(0.5)
    assert not (demo["tmp"] / "cancel-out" / "_SUCCESS").exists()


def test_a_failing_job_reports_failed_with_every_ranks_error(demo):
    from tprun.submit import submit

    spec = JobSpec.from_yaml(EXAMPLE).model_copy(update={
        "model": str(demo["tmp"] / "no-such-model"), "input": str(ROOT / "examples" / "prompts.jsonl"),
        "output": str(demo["tmp"] / "failed-out"),
    })
    handle = submit(spec, backend="slurm", folder=demo["tmp"] / "failed-logs")
    assert handle.wait(timeout=JOB_TIMEOUT_S, poll_s=1) == "FAILED"
    logs = handle.logs()
    for rank in (0, 1):
        assert f"TprunTaskError: tprun rank {rank} (job {handle.job_id}) exited with 2" in logs
        assert f"===== rank {rank} stderr =====" in logs
    assert "no-such-model" in logs  # the runner's own message, carried into the error


def test_slurm_accepts_a_rendered_gpu_job(tmp_path):
    from tprun.cluster.slurm_render import render_sbatch

    # The cluster's nodes have fake GPUs (gres on character devices), so --gpus-per-node is real here.
    data = yaml.safe_load(EXAMPLE.read_text())
    data["parallel"]["data_parallel_size"] = 2  # TP=2 x DP=2: two GPU processes on each of two nodes
    data["resources"].update(gpus_per_node=2, procs_per_node=2)
    script = tmp_path / "gpu.sbatch"
    script.write_text(render_sbatch(JobSpec.model_validate(data), "job.yaml"))
    assert "#SBATCH --gpus-per-node=2" in script.read_text()
    proc = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True, timeout=30,
                          check=False)
    assert proc.returncode == 0 and "to start at" in proc.stderr, proc.stderr


def test_hostlist_expands_like_this_clusters_scontrol():
    for expr in ("slurm-node[01-02]", "gpu-[007-009,012],cpu1", "rack[1-2]-n[01-02]", "n[098-101]"):
        assert expand_hostlist(expr) == run(["scontrol", "show", "hostnames", expr]).stdout.split()
