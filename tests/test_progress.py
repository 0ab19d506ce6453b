"""Rank 0's progress: records done / total, tok/s and ETA from the store's counters; a bar on a terminal,
plain lines in quiet mode (log files), and a final summary either way."""

from __future__ import annotations

import datetime
import time

import pytest
import torch.distributed as dist

from tprun.config import JobSpec
from tprun.runner import keys
from tprun.runner.progress import Progress, Snapshot


@pytest.fixture
def store():
    return dist.TCPStore("127.0.0.1", 0, 1, True, timeout=datetime.timedelta(seconds=10), wait_for_workers=False)


def test_line_reports_done_over_total_rate_and_eta(store):
    p = Progress(store, total=100, already_done=20, quiet=True)
    assert p.line(Snapshot(records=30, tokens=600, elapsed=60.0)) == \
        "tprun: 50/100 records (50%), 10.0 tok/s, ETA 1m40s"  # 2 s per record this run, 50 left
    assert p.line(Snapshot(records=0, tokens=0, elapsed=1.0)).endswith("ETA ?")


def test_quiet_mode_prints_plain_lines_from_the_counters(store, capsys):
    p = Progress(store, total=10, already_done=0, quiet=True, interval_s=0.1, refresh_s=0.05).start()
    store.add(keys.RECORDS_DONE, 4)
    store.add(keys.TOKENS_DONE, 40)
    err, deadline = "", time.monotonic() + 30  # the printing thread may be starved on a busy machine
    while "tprun: 4/10 records" not in err and time.monotonic() < deadline:
        time.sleep(0.05)
        err += capsys.readouterr().err
    p.close()
    err += capsys.readouterr().err
    assert "tprun: 4/10 records (40%)" in err and "\r" not in err


@pytest.mark.parametrize("quiet", [True, False])
def test_job_prints_a_summary_and_a_bar_only_when_not_quiet(demo_model, tmp_path, monkeypatch, capsys, quiet):
    from tests.runner_harness import job_rows, write_jsonl
    from tprun.runner.job import run_job

    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    spec = JobSpec(model=str(demo_model), input=str(write_jsonl(tmp_path / "in.jsonl", job_rows(6))),
                   output=str(tmp_path / "out"), chunk_size=2, sampling={"max_tokens": 3, "ignore_eos": True})
    assert run_job(spec, quiet=quiet) == 0  # 5 records x 3 tokens + 1 with its own max_tokens 4
    err = capsys.readouterr().err
    assert "tprun: done: 6 records, 0 error(s), 19 tokens generated" in err
    assert "group 0 (rank 0): 6 records in 3 chunk(s), 19 tokens" in err
    assert ("6/6" in err and "rec" in err) == (not quiet)
