"""Real Slurm stops a running job, and it still ends COMPLETED with exactly the results of an
uninterrupted run: each record once, none lost. Cluster of scripts/slurm-up.sh: partition `urgent`
preempts `batch` (PreemptMode=REQUEUE, 20 s grace), and a requeued job restarts after about 12 s.

What Slurm 22.05 sends each task, as seen on that cluster:
  scontrol requeue        SIGCONT + SIGTERM (the batch shell too); SIGKILL after KillWait; Slurm requeues
  preemption, with grace  SIGCONT + SIGTERM; at the grace's end SIGTERM, SIGCONT, SIGTERM (the batch shell
                          too), then SIGKILL; Slurm requeues
  time limit              the --signal (USR1 in deploy/slurm.sbatch, USR2 under submitit) up to 60 s
                          earlier than asked; at the limit SIGTERM, SIGCONT, SIGTERM; TIMEOUT is final
  submitit Job._interrupt SIGTERM then USR2 (scancel --signal), which Slurm itself does not requeue
Where SlurmctldParameters has preempt_send_user_signal, Slurm's source sends the job's --signal instead
of the first SIGTERM of a preemption with grace, and right before the SIGTERM of one without.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.runner_harness import start_torchrun
from tests.test_slurm_cluster import (
    EXAMPLE,
    FINAL,
    JOB_TIMEOUT_S,
    ROOT,
    _cluster_problem,
    run,
    venv_env,
    wait_job,
)
from tprun.config import JobSpec, SamplingParams
from tprun.runner.exit_codes import EXIT_OK

_PROBLEM = _cluster_problem()
pytestmark = [
    pytest.mark.slurm,
    pytest.mark.timeout(300),
    pytest.mark.skipif(_PROBLEM is not None, reason=str(_PROBLEM)),
]

# 16 chunks of 4 records, 32 tokens each, one chunk at a time (a batch holds one chunk): a few seconds of
# decoding, so a job is stopped mid-run.
NUM_RECORDS, CHUNK, MAX_TOKENS = 64, 4, 32
FLAGS = ["--chunk-size", str(CHUNK), "--max-tokens", str(MAX_TOKENS), "--ignore-eos", "--engine",
         f"max_num_seqs={CHUNK}", "--quiet"]
STEP_TIMEOUT_S = 120
REFERENCE_TIMEOUT_S = 240
ACCOUNTING_LAG_S = 30


@pytest.fixture(scope="module")
def job(demo_model, tmp_path_factory):
    """The input, and the reference: the same job under torchrun (TP=2, one host), never stopped. It runs
    while the first Slurm job waits to restart (cores idle); `reference()` waits for it."""
    tmp = tmp_path_factory.mktemp("slurm-requeue")
    inp = tmp / "stories.jsonl"
    inp.write_text("".join(json.dumps({"id": f"s{i}", "prompt": f"Story number {i}:"}) + "\n"
                           for i in range(NUM_RECORDS)))
    ref, log = tmp / "torchrun-out", tmp / "torchrun.log"
    proc = start_torchrun(2, [str(EXAMPLE), "--model", str(demo_model), "--input", str(inp), "--output", str(ref),
                              *FLAGS], log)

    def reference() -> str:
        assert proc.wait(timeout=REFERENCE_TIMEOUT_S) == EXIT_OK, log.read_text()
        return (ref / "results.jsonl").read_text()

    yield {"tmp": tmp, "model": demo_model, "input": inp, "reference": reference}
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


@pytest.fixture
def scancel_at_end():
    """Job ids appended to the list are cancelled when the test ends, whatever happened."""
    ids: list[str] = []
    yield ids
    for job_id in ids:
        subprocess.run(["scancel", job_id], timeout=30, check=False)


def runs(job_id: str) -> list[str]:
    """The State of each run of the job, oldest first (sacct -D keeps the requeued ones)."""
    out = run(["sacct", "-D", "-X", "-n", "-P", "-o", "JobID,State", "-j", job_id], timeout=30).stdout
    return [line.split("|")[1].split()[0] for line in out.splitlines() if line.split("|")[0] == job_id]


def settled_runs(job_id: str, count: int) -> list[str]:
    """runs(), once accounting has caught up (slurmdbd records a requeue a moment after it happens)."""
    deadline = time.monotonic() + ACCOUNTING_LAG_S
    while (len(states := runs(job_id)) < count or set(states) & {"PENDING", "RUNNING"}) and \
            time.monotonic() < deadline:
        time.sleep(0.5)
    return states


def done_chunks(out: Path) -> set[str]:
    return {p.name for p in (out / "parts").glob("chunk-*.done")}


def wait_for_new_chunk(job_id: str, out: Path, seen: set[str], log: Path) -> set[str]:
    """Wait until the running job finishes a chunk not in `seen`: it is mid-run, with its stop handlers
    in place. Returns the finished chunks."""
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while not (done := done_chunks(out)) - seen:
        state = run(["squeue", "-h", "-j", job_id, "-o", "%T"], timeout=30).stdout.strip()
        assert state in ("PENDING", "CONFIGURING", "RUNNING", "REQUEUED", "COMPLETING", ""), (state, tail(log))
        assert time.monotonic() < deadline, f"job {job_id}: no new chunk in {STEP_TIMEOUT_S} s\n{tail(log)}"
        time.sleep(0.1)
    assert len(done) < NUM_RECORDS // CHUNK, f"job {job_id} finished before it was stopped; nothing tested"
    return done


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else f"(no {log})"


def assert_resumed_to_reference(out: Path, log: Path, job: dict, stops: int) -> None:
    """Identical results, each id once, and each restart skipped what earlier runs had finished."""
    assert (out / "results.jsonl").read_text() == job["reference"]()
    ids = [json.loads(line)["id"] for line in (out / "results.jsonl").read_text().splitlines()]
    assert ids == [f"s{i}" for i in range(NUM_RECORDS)]
    # rank 0 of each run says how many records it had left: all at first, then fewer and fewer, never 0
    # (each stop left work behind, and no run started over)
    left = [int(n) for n in re.findall(rf"running (\d+) of {NUM_RECORDS} records", log.read_text())]
    assert len(left) == stops + 1 and left[0] == NUM_RECORDS, (left, tail(log))
    assert all(a > b > 0 for a, b in zip(left, left[1:])), (left, tail(log))
    assert (out / "_SUCCESS").exists()


def test_scontrol_requeue_of_a_running_sbatch_job_resumes_to_identical_results(job, scancel_at_end):
    out, log = job["tmp"] / "sbatch-out", job["tmp"] / "sbatch-%j.out"
    job_id = run(["sbatch", "--parsable", f"--output={log}", "deploy/slurm.sbatch", "--model", str(job["model"]),
                  "--input", str(job["input"]), "--output", str(out), *FLAGS],
                 cwd=ROOT, env=venv_env()).stdout.strip()
    scancel_at_end.append(job_id)
    log = Path(str(log).replace("%j", job_id))

    wait_for_new_chunk(job_id, out, set(), log)
    run(["scontrol", "requeue", job_id], timeout=30)
    assert wait_job(job_id, log, timeout=JOB_TIMEOUT_S) == "COMPLETED", tail(log)

    assert settled_runs(job_id, 2) == ["REQUEUED", "COMPLETED"]
    assert_resumed_to_reference(out, log, job, stops=1)


def test_submitit_job_interrupted_then_preempted_resumes_to_identical_results(job, tmp_path, scancel_at_end):
    """A submitit job stopped both ways its job can be: submitit's own preemption signals (SIGTERM then
    USR2, what Job._interrupt() sends; Slurm does not requeue it, the job requeues itself), then a real
    preemption by a job of the higher partition (Slurm requeues it)."""
    from tprun.submit import submit

    out = tmp_path / "out"
    spec = JobSpec.from_yaml(EXAMPLE).model_copy(update={
        "model": str(job["model"]), "input": str(job["input"]), "output": str(out), "chunk_size": CHUNK,
        "engine": {"max_num_seqs": CHUNK},
        "sampling": SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True),
    })
    handle = submit(spec, backend="slurm", folder=tmp_path / "logs")
    scancel_at_end.append(handle.job_id)
    log = tmp_path / "logs" / handle.job_id / f"{handle.job_id}_0_log.err"  # rank 0, every run appended

    wait_for_new_chunk(handle.job_id, out, set(), log)
    for sig in ("TERM", "USR2"):
        run(["scancel", "--signal", sig, handle.job_id], timeout=30)
    # Its batch script requeues it once every task has exited; then, a chunk into the next run, preempt it.
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while (first := runs(handle.job_id)[:1]) != ["REQUEUED"]:
        assert not set(first) & FINAL, f"job {handle.job_id} was not requeued: {first}\n{handle.logs()}"
        assert time.monotonic() < deadline, f"job {handle.job_id} still {first} after {STEP_TIMEOUT_S} s"
        time.sleep(0.5)
    wait_for_new_chunk(handle.job_id, out, done_chunks(out), log)
    # Frozen until the preemption's SIGCONT: Slurm takes a second or two to preempt, time in which a fast
    # machine could finish the job and leave nothing to test.
    run(["scancel", "--signal", "STOP", handle.job_id], timeout=30)
    urgent_log = tmp_path / "urgent.out"
    urgent = run(["sbatch", "--parsable", "--partition=urgent", "--nodes=2", "--exclusive", f"--output={urgent_log}",
                  "--wrap", "true"], cwd=tmp_path).stdout.strip()
    scancel_at_end.append(urgent)

    assert wait_job(urgent, urgent_log, timeout=60) == "COMPLETED"  # it ran: it had preempted the job
    assert handle.wait(timeout=JOB_TIMEOUT_S, poll_s=1) == "COMPLETED", handle.logs()
    # The first stop was requeued by the job; the preemption by the job (still RUNNING in its grace
    # time, once tprun had stopped) or by Slurm (when tprun was still at it when the grace ran out).
    history = settled_runs(handle.job_id, 3)
    assert history[0] == "REQUEUED" and history[1] in ("REQUEUED", "PREEMPTED") and history[2:] == ["COMPLETED"]
    assert_resumed_to_reference(out, log, job, stops=2)
