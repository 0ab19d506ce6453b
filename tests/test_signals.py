"""Preemption: a stop signal ends every rank cleanly with exit 75 (requeue), no partial record is
visible, and rerunning the same command completes the job with exactly the uninterrupted results."""

from __future__ import annotations

import json
import signal

import pytest

from tests.runner_harness import (
    done_chunks,
    job_rows,
    launch_ranks,
    read_jsonl,
    run_args,
    run_cli,
    run_torchrun,
    wait_for,
    write_jsonl,
)
from tprun.runner.exit_codes import EXIT_OK, EXIT_REQUEUE
from tprun.runner.inputs import scan_input

pytestmark = pytest.mark.slow


def assert_no_partial_records(out, reference_job) -> None:
    """Every part on disk has its done marker and exactly the records of its chunk's lines."""
    from tprun.config import SamplingParams

    index = scan_input(reference_job.input, 2, SamplingParams())
    visible = sorted((out / "parts").glob("chunk-*.jsonl"))
    assert [int(p.stem.split("-")[1]) for p in visible] == done_chunks(out)
    for p in visible:
        k = int(p.stem.split("-")[1])
        assert [r["line"] for r in read_jsonl(p)] == list(index.chunk_lines(k))
    assert not (out / "results.jsonl").exists() and not (out / "_SUCCESS").exists()


@pytest.mark.parametrize("signalled", ["all", "one"], ids=["sigterm-every-rank", "sigterm-rank1-only"])
def test_sigterm_stops_cleanly_for_requeue_and_rerun_completes(reference_job, tmp_path, signalled):
    """'one': only rank 1 is told (a single evicted pod): its TP group agrees to stop with it, and the
    other group stops at its next chunk boundary, so the whole job requeues together."""
    out = tmp_path / "out"
    args = reference_job.args(out, "--tp", "2", "--dp", "2", "--chunk-size", "2")
    ranks = launch_ranks(4, args, tmp_path / "logs")
    wait_for(lambda: len(done_chunks(out)) >= 1, timeout=180, what="a finished chunk", ranks=ranks)
    ranks.signal(signal.SIGTERM, None if signalled == "all" else [1])
    exit_after = ranks.wait(timeout=120)
    assert ranks.codes == [EXIT_REQUEUE] * 4, (ranks.codes, ranks.output())
    assert max(exit_after) < 60
    assert "SIGTERM: finishing the chunk(s) in flight" in ranks.output(1)
    assert f"exiting with {EXIT_REQUEUE} so the job is requeued" in ranks.output(0)
    assert 1 <= len(done_chunks(out)) < 20, "the job finished before the signal; nothing was tested"
    assert_no_partial_records(out, reference_job)

    r = run_torchrun(4, args)
    assert r.returncode == EXIT_OK, r.stdout + r.stderr
    assert (out / "results.jsonl").read_text() == reference_job.results
    assert len({json.loads(x)["id"] for x in reference_job.results.splitlines()}) == 40


def _slow_job(demo_model, tmp_path, records: int, chunk_size: int, first: int, second: int):
    """One process on chunks that take seconds (one sequence at a time, 200 tokens each); sends `first`
    once it runs, `second` once the first was handled (two pending signals of one kind would merge into
    one, and pending ones are delivered by number, not in the order sent). Returns the ranks (ended), the
    output dir and the job's args."""
    inp = write_jsonl(tmp_path / "in.jsonl", job_rows(records))
    out = tmp_path / "out"
    args = run_args(demo_model, inp, out, "--max-tokens", "200", "--ignore-eos", "--chunk-size", str(chunk_size),
                    "--engine", "max_num_seqs=1")
    ranks = launch_ranks(1, args, tmp_path / "logs")
    wait_for(lambda: f"running {records} of {records} records" in ranks.output(), timeout=120,
             what="the job to start", ranks=ranks)
    ranks.signal(first)
    name = signal.Signals(first).name
    wait_for(lambda: f"{name}: finishing the chunk(s) in flight" in ranks.output(), timeout=60,
             what=f"the job to handle {name}", ranks=ranks)
    ranks.signal(second)
    return ranks, ranks.wait(timeout=120), out, args


def test_second_signal_abandons_the_chunk_in_flight_at_once(demo_model, tmp_path):
    ranks, exit_after, out, args = _slow_job(demo_model, tmp_path, 20, 20, signal.SIGTERM, signal.SIGTERM)
    assert ranks.codes == [EXIT_REQUEUE], ranks.output()
    assert exit_after[0] < 30  # the chunk alone takes longer; done_chunks below is the exact check
    assert "SIGTERM again: abandoning the chunk(s) in flight" in ranks.output()
    assert done_chunks(out) == [] and not list(out.glob("parts/chunk-*.jsonl"))
    assert not (out / "results.jsonl").exists()

    r = run_cli(args)
    assert r.returncode == EXIT_OK, r.stderr
    assert [x["id"] for x in read_jsonl(out / "results.jsonl")] == [f"r{i}" for i in range(20)]


def test_term_then_usr2_is_one_stop_that_still_finishes_the_chunk(demo_model, tmp_path):
    """submitit's interrupt and Slurm's preemption announce one stop with two different signals."""
    ranks, _, out, _ = _slow_job(demo_model, tmp_path, 8, 4, signal.SIGTERM, signal.SIGUSR2)
    assert ranks.codes == [EXIT_REQUEUE], ranks.output()
    assert "SIGUSR2 too: already stopping (SIGTERM)" in ranks.output()
    assert done_chunks(out) == [0], "the chunk in flight is finished and written, the next one not started"
