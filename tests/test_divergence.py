"""The engine's divergence detector, seen from a job: a TP rank that samples a different token stops
the job with the step and the ranks named; honest runs never trip it."""

from __future__ import annotations

import pytest

from tests.runner_harness import job_rows, launch_ranks, read_jsonl, run_args, write_jsonl
from tprun.runner.exit_codes import EXIT_FAILED, EXIT_OK, EXIT_PEER_FAILED

pytestmark = pytest.mark.slow

# 24 decode steps per chunk: past the default check interval (16) within the first chunk.
ARGS = ("--tp", "2", "--max-tokens", "24", "--ignore-eos", "--chunk-size", "4")


@pytest.fixture
def job(demo_model, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", job_rows(8))
    return run_args(demo_model, inp, tmp_path / "out", *ARGS), tmp_path / "out"


def test_perturbed_rank_stops_the_job_naming_step_and_ranks(job, tmp_path):
    args, out = job
    ranks = launch_ranks(2, args, tmp_path / "logs", TPRUN_TEST_PERTURB_RANK="1")
    ranks.wait(timeout=120)
    assert EXIT_FAILED in ranks.codes and set(ranks.codes) <= {EXIT_FAILED, EXIT_PEER_FAILED}, ranks.output()
    text = ranks.output()
    assert "tensor-parallel ranks diverged by step 16: ranks [0] vs [1]" in text
    assert not (out / "results.jsonl").exists()


def test_honest_run_is_silent(job, tmp_path):
    args, out = job
    ranks = launch_ranks(2, args, tmp_path / "logs")
    ranks.wait(timeout=120)
    assert ranks.codes == [EXIT_OK, EXIT_OK], ranks.output()
    assert "diverge" not in ranks.output()
    assert len(read_jsonl(out / "results.jsonl")) == 8
