"""Resume: rerunning a job on its output directory finishes only what is missing; another job's output
directory is refused (or replaced with --overwrite); finished chunks are never redone or duplicated.

One process, in-process `run_job`: the crash states are made by hand, exactly as a kill leaves them
(a part renamed into place without its done marker, a writer's temp file). Real kills and signals are
in test_dp_tp.py and test_signals.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tprun.config import JobSpec
from tprun.runner import manifest, parts
from tprun.runner.exit_codes import EXIT_JOB_ERROR, EXIT_OK
from tprun.runner.inputs import LineError, scan_input
from tprun.runner.preflight import JobError, check_model


@pytest.fixture
def spec(reference_job, tmp_path, monkeypatch) -> JobSpec:
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "SLURM_JOB_ID",
                "JOB_COMPLETION_INDEX"):
        monkeypatch.delenv(var, raising=False)
    # The reference job's settings (tests/runner_harness.py SAMPLING), in 4 chunks.
    return JobSpec(model=str(reference_job.model), input=str(reference_job.input), output=str(tmp_path / "out"),
                   dtype="float64", chunk_size=10, engine={"seed": 7},
                   sampling={"temperature": 0.8, "top_p": 0.9, "max_tokens": 12, "ignore_eos": True})


def run(spec: JobSpec, capsys, **kw) -> tuple[int, str]:
    from tprun.runner.job import run_job

    code = run_job(spec, quiet=True, **kw)
    return code, capsys.readouterr().err


def changed(spec: JobSpec, **update) -> JobSpec:
    return JobSpec.model_validate({**spec.model_dump(), **update})


def finished_at(out: Path) -> dict[int, float]:
    return {k: parts.read_done(out, k)["finished_at"] for k in range(4) if parts.is_done(out, k)}


def test_rerun_finishes_only_unfinished_chunks_with_identical_results(spec, reference_job, capsys):
    out = Path(spec.output)
    assert run(spec, capsys)[0] == EXIT_OK
    assert (out / "results.jsonl").read_text() == reference_job.results
    # A crash after chunks 0 and 2 were done: chunk 3's part renamed into place but not its marker,
    # chunk 1's writer killed mid-write, no merge yet.
    for name in ("results.jsonl", "errors.jsonl", "summary.json", "_SUCCESS"):
        (out / name).unlink()
    parts.done_path(out, 1).unlink()
    parts.part_path(out, 1).rename(out / "parts" / f".{parts.part_path(out, 1).name}.tmp-4242")
    parts.done_path(out, 3).unlink()
    before = finished_at(out)

    code, err = run(spec, capsys)
    assert code == EXIT_OK, err
    assert "running 20 of 40 records" in err
    after = finished_at(out)
    assert {k: after[k] for k in (0, 2)} == before  # untouched
    assert sorted(after) == [0, 1, 2, 3]
    assert not list(out.glob("parts/.*.tmp-*"))
    assert (out / "results.jsonl").read_text() == reference_job.results
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["records"], summary["groups"][0]["chunks"]) == (40, 2)


def test_rerun_of_a_complete_job_does_nothing(spec, capsys):
    out = Path(spec.output)
    assert run(spec, capsys)[0] == EXIT_OK
    stamp = (out / "results.jsonl").stat().st_mtime_ns
    code, err = run(spec, capsys)
    assert code == EXIT_OK
    assert "already holds this job's complete results" in err
    assert (out / "results.jsonl").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("change, named", [
    ({"sampling": {"temperature": 0.5, "top_p": 0.9, "max_tokens": 12, "ignore_eos": True}},
     "sampling.temperature"),
    ({"engine": {"seed": 8}}, "engine.seed"),
    ({"chunk_size": 7}, "chunk_size"),
    ({"dtype": "float32"}, "dtype"),
    ({"parallel": {"tensor_parallel_size": 2}}, "tensor_parallel_size"),
])
def test_another_job_on_the_same_output_is_refused_naming_the_difference(spec, capsys, change, named):
    out = Path(spec.output)
    assert run(spec, capsys)[0] == EXIT_OK
    results = (out / "results.jsonl").read_text()
    other = changed(spec, **change)
    if named == "tensor_parallel_size":  # a world of one cannot run tp=2: ask the manifest directly
        idx = scan_input(other.input, other.chunk_size, other.sampling)
        ident = manifest.job_identity(other, idx.sha256, idx.num_lines, check_model(other.model).identity)
        with pytest.raises(JobError, match=r"different tensor_parallel_size\); use a new --output"):
            manifest.check(out, ident, overwrite=False)
        return
    code, err = run(other, capsys)
    assert code == EXIT_JOB_ERROR
    assert f"holds another job's results (different {named})" in err and "--overwrite" in err
    assert (out / "results.jsonl").read_text() == results


def test_changed_input_or_model_is_refused(spec, demo_model, tmp_path, capsys):
    from tprun.demo_model import make_demo_model

    assert run(spec, capsys)[0] == EXIT_OK
    moved = tmp_path / "same-input-elsewhere.jsonl"
    moved.write_bytes(Path(spec.input).read_bytes())
    assert run(changed(spec, input=str(moved)), capsys)[0] == EXIT_OK  # same content: same job
    moved.write_bytes(Path(spec.input).read_bytes() + b'{"prompt": "one more"}\n')
    code, err = run(changed(spec, input=str(moved)), capsys)
    assert code == EXIT_JOB_ERROR and "(different input)" in err
    other_model = make_demo_model(tmp_path / "other-model", seed=1)
    code, err = run(changed(spec, model=str(other_model)), capsys)
    assert code == EXIT_JOB_ERROR and "(different model)" in err


def test_overwrite_replaces_another_jobs_output_but_keeps_foreign_files(spec, capsys):
    out = Path(spec.output)
    assert run(spec, capsys)[0] == EXIT_OK
    (out / "notes.txt").write_text("mine")
    other = changed(spec, sampling={**spec.sampling.model_dump(), "max_tokens": 3})
    code, err = run(other, capsys, overwrite=True)
    assert code == EXIT_OK, err
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 40
    assert {r["id"]: len(r["output_token_ids"]) for r in rows} == {f"r{i}": 4 if i == 13 else 3 for i in range(40)}
    assert (out / "notes.txt").read_text() == "mine"


def test_overwrite_never_discards_the_same_jobs_progress(spec, capsys):
    """A requeue repeats the command line, --overwrite included: it must resume, not start over."""
    out = Path(spec.output)
    assert run(spec, capsys)[0] == EXIT_OK
    (out / "_SUCCESS").unlink()
    parts.done_path(out, 2).unlink()
    before = finished_at(out)
    code, err = run(spec, capsys, overwrite=True)
    assert code == EXIT_OK, err
    assert "running 10 of 40 records" in err
    assert {k: finished_at(out)[k] for k in before} == before


def test_fingerprint_ignores_what_only_changes_speed_or_placement(spec):
    ident = manifest.job_identity(spec, "abc", 40, {"config_sha256": "x"})
    faster = changed(spec, parallel={"tensor_parallel_size": 1, "data_parallel_size": 4},
                     engine={"seed": 7, "max_num_seqs": 8, "kv_cache_memory": 10**6, "dist_timeout_s": 60},
                     name="renamed", on_bad_input="fail")
    assert manifest.job_identity(faster, "abc", 40, {"config_sha256": "x"}) == ident
    explicit_default = changed(spec, engine={"seed": 7, "max_model_len": None})
    assert manifest.job_identity(explicit_default, "abc", 40, {"config_sha256": "x"}) == ident


def test_merge_orders_by_input_and_collects_engine_errors(tmp_path):
    out = tmp_path
    rec = {"output_text": "", "output_token_ids": [1], "finish_reason": "length", "num_prompt_tokens": 2}
    parts.write_part(out, 1, [{"line": 2, "id": "c", **rec}], {"records": 1})
    parts.write_part(out, 0, [{"line": 0, "id": "a", **rec},
                              {"line": 1, "id": "b", **rec, "finish_reason": "error", "error": "too long"}],
                     {"records": 2})
    stats = parts.merge(out, 2, [LineError(3, "malformed JSON")])
    assert [json.loads(x)["id"] for x in (out / "results.jsonl").read_text().splitlines()] == ["a", "b", "c"]
    assert "line" not in (out / "results.jsonl").read_text()
    errors = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert errors == [{"line": 2, "id": "b", "error": "too long"}, {"line": 4, "id": None, "error": "malformed JSON"}]
    assert (stats.records, stats.errors, stats.output_tokens) == (3, 2, 3)
    with pytest.raises(RuntimeError, match=r"1 chunk\(s\) not done"):
        parts.merge(out, 3, [])
