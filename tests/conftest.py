"""Fixtures shared across test files. Keep each one small and session-scoped when it is expensive."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory) -> Path:
    """The tiny random Llama checkpoint of `tprun demo-model` (seed 0), built once per session."""
    from tprun.demo_model import make_demo_model

    return make_demo_model(tmp_path_factory.mktemp("demo-model") / "llama", arch="llama", seed=0)


@pytest.fixture(scope="session")
def reference_job(demo_model, tmp_path_factory):
    """40 records of every prompt kind, run in one process: what every parallel, interrupted or resumed
    run of the same job must reproduce byte for byte."""
    from tests.runner_harness import ReferenceJob, job_rows, run_cli, write_jsonl

    base = tmp_path_factory.mktemp("reference-job")
    job = ReferenceJob(demo_model, write_jsonl(base / "in.jsonl", job_rows(40)), "", 40)
    r = run_cli(job.args(base / "out", "--chunk-size", "40"), timeout=300)
    assert r.returncode == 0, r.stderr
    return ReferenceJob(job.model, job.input, (base / "out" / "results.jsonl").read_text(), job.num_records)
