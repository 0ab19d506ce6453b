"""Data parallel x tensor parallel jobs: same results as one process, and a dead rank hangs nobody."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter

import pytest

from tests.runner_harness import (
    alive,
    done_chunks,
    launch_ranks,
    run_torchrun,
    start_torchrun,
    wait_for,
    worker_pids,
)
from tprun.runner.exit_codes import EXIT_OK, EXIT_PEER_FAILED

pytestmark = pytest.mark.slow


# A pause after each chunk, so that a kill lands mid-job however fast the machine is.
SLOW = {"TPRUN_TEST_CHUNK_DELAY_S": "1"}


def assert_each_id_once(results_text: str, n: int) -> None:
    ids = Counter(json.loads(line)["id"] for line in results_text.splitlines())
    assert len(ids) == n and set(ids.values()) == {1}


def test_tp2_dp2_results_equal_single_process(reference_job, tmp_path):
    out = tmp_path / "out"
    r = run_torchrun(4, reference_job.args(out, "--tp", "2", "--dp", "2", "--chunk-size", "3"))
    assert r.returncode == EXIT_OK, r.stdout + r.stderr
    assert (out / "results.jsonl").read_text() == reference_job.results
    assert_each_id_once(reference_job.results, 40)
    summary = json.loads((out / "summary.json").read_text())
    assert [g["ranks"] for g in summary["groups"]] == [[0, 1], [2, 3]]
    assert sum(g["chunks"] for g in summary["groups"]) == 14  # ceil(40 / 3), each chunk once
    assert "group 1 (ranks 2-3)" in r.stderr and "tok/s" in r.stderr


def test_dp2_results_equal_single_process(reference_job, tmp_path):
    out = tmp_path / "out"
    r = run_torchrun(2, reference_job.args(out, "--dp", "2", "--chunk-size", "5"))
    assert r.returncode == EXIT_OK, r.stdout + r.stderr
    assert (out / "results.jsonl").read_text() == reference_job.results


def test_kill9_of_one_torchrun_worker_ends_every_rank_within_60s_and_rerun_matches(reference_job, tmp_path):
    out = tmp_path / "out"
    args = reference_job.args(out, "--tp", "2", "--dp", "2", "--chunk-size", "2")
    agent = start_torchrun(4, args, tmp_path / "torchrun.log", **SLOW)
    try:
        wait_for(lambda: len(done_chunks(out)) >= 2, timeout=180, what="two finished chunks")
        workers = worker_pids(agent.pid)
        assert sorted(workers) == [0, 1, 2, 3]
        os.kill(workers[3], 9)
        t0 = time.monotonic()
        agent.wait(timeout=90)
        while any(alive(pid) for pid in workers.values()):
            assert time.monotonic() - t0 < 60, "a worker outlived the job by 60 s"
            time.sleep(0.1)
        assert time.monotonic() - t0 < 60
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode != 0
    assert len(done_chunks(out)) < 20 and not (out / "results.jsonl").exists()

    r = run_torchrun(4, args)
    assert r.returncode == EXIT_OK, r.stdout + r.stderr
    assert (out / "results.jsonl").read_text() == reference_job.results
    assert_each_id_once(reference_job.results, 40)


@pytest.mark.parametrize("victim", [3, 0], ids=["rank3", "rank0-store-host"])
def test_kill9_of_one_rank_stops_every_rank_within_60s_and_rerun_matches(reference_job, tmp_path, victim):
    """Ranks run without torchrun's agent, which would kill the survivors itself: the runner must."""
    out = tmp_path / "out"
    args = reference_job.args(out, "--tp", "2", "--dp", "2", "--chunk-size", "2")
    ranks = launch_ranks(4, args, tmp_path / "logs", **SLOW)
    wait_for(lambda: len(done_chunks(out)) >= 2, timeout=180, what="two finished chunks", ranks=ranks)
    ranks.signal(signal.SIGKILL, [victim])
    exit_after = ranks.wait(timeout=90)
    survivors = [r for r in range(4) if r != victim]
    assert max(exit_after[r] for r in survivors) < 60, (exit_after, ranks.output())
    assert all(ranks.codes[r] == EXIT_PEER_FAILED for r in survivors), (ranks.codes, ranks.output())
    assert f"rank {victim}" in ranks.output(survivors[0]) + ranks.output(survivors[-1])
    assert len(done_chunks(out)) < 20, "the job finished before the kill; nothing was tested"
    assert not (out / "results.jsonl").exists()

    r = run_torchrun(4, args)
    assert r.returncode == EXIT_OK, r.stdout + r.stderr
    results = (out / "results.jsonl").read_text()
    assert results == reference_job.results
    assert_each_id_once(results, 40)


def test_dead_rank_of_another_dp_group_is_caught_by_heartbeats_within_60s(reference_job, tmp_path):
    """TP=1 x DP=2: the two ranks share no collective, only the store, so only the watchdog's heartbeats
    (default timeout) can tell rank 0 that rank 1 is gone."""
    out = tmp_path / "out"
    ranks = launch_ranks(2, reference_job.args(out, "--dp", "2", "--chunk-size", "1"), tmp_path / "logs", **SLOW)
    wait_for(lambda: len(done_chunks(out)) >= 2, timeout=180, what="two finished chunks", ranks=ranks)
    ranks.signal(signal.SIGKILL, [1])
    exit_after = ranks.wait(timeout=90)
    assert exit_after[0] < 60 and ranks.codes[0] == EXIT_PEER_FAILED, (exit_after, ranks.output())
    assert "rank 1 (" in ranks.output(0) and "stopped heartbeating" in ranks.output(0)
    assert not (out / "results.jsonl").exists()


def test_torchrun_max_restarts_resumes_the_job_in_place_after_a_worker_dies(reference_job, tmp_path):
    """torchrun's agent store outlives the attempt: the restarted ranks must not read the dead attempt's keys."""
    out = tmp_path / "out"
    args = reference_job.args(out, "--tp", "2", "--chunk-size", "2")
    log = tmp_path / "torchrun.log"
    agent = start_torchrun(2, args, log, torchrun_args=("--max-restarts", "1"), **SLOW)
    try:
        wait_for(lambda: len(done_chunks(out)) >= 2, timeout=180, what="two finished chunks")
        assert len(done_chunks(out)) < 20, "the job finished before the kill; nothing was tested"
        os.kill(worker_pids(agent.pid)[1], 9)
        agent.wait(timeout=240)
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode == EXIT_OK, log.read_text()[-5000:]
    results = (out / "results.jsonl").read_text()
    assert results == reference_job.results
    assert_each_id_once(results, 40)
