"""Bad input: every problem gets a clear message, and the good records still complete.

Per-line problems go to OUT/errors.jsonl (1-based line number, id where known, reason); job-level
problems stop every rank before any rendezvous, with exit code 2 (3 for --on-bad-input fail).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.runner_harness import (
    ROOT,
    base_env,
    launch_ranks,
    private_dir,
    read_jsonl,
    run_args,
    run_cli,
    write_jsonl,
)
from tprun.config import JobSpec, SamplingParams
from tprun.runner.exit_codes import EXIT_BAD_INPUT, EXIT_JOB_ERROR, EXIT_OK
from tprun.runner.inputs import LineError, Record, parse_line, record_seed, sampling_for, scan_input

DEFAULTS = SamplingParams(max_tokens=4)


def parse(obj, line: int = 0, vocab_size: int | None = 331):
    raw = obj if isinstance(obj, bytes) else (obj if isinstance(obj, str) else json.dumps(obj)).encode()
    return parse_line(raw, line, DEFAULTS, vocab_size)


@pytest.mark.parametrize("line, reason", [
    ('{"prompt": "a"', "malformed JSON"),
    ("[1, 2]", "expected a JSON object, got an array"),
    ({"id": 1}, "missing prompt: give one of prompt, prompt_token_ids, messages"),
    ({"prompt": ""}, "empty prompt"),
    ({"prompt_token_ids": []}, "empty prompt"),
    ({"messages": [{"role": "user", "content": ""}]}, "empty prompt"),
    ({"messages": []}, "messages must be a non-empty list"),
    ({"messages": [{"role": "user"}]}, "messages[0] must be an object"),
    ({"prompt": 5}, "prompt must be a string"),
    ({"prompt_token_ids": [1, "2"]}, "prompt_token_ids must be a list of integers"),
    ({"prompt_token_ids": [1, 331]}, "token id 331 outside the model's vocabulary [0, 331)"),
    ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "give exactly one of"),
    ({"prompt": "a", "temperature": -0.5}, "invalid sampling value: temperature=-0.5"),
    ({"prompt": "a", "top_p": 0}, "invalid sampling value: top_p=0"),
    ({"prompt": "a", "top_p": 1.5}, "invalid sampling value: top_p=1.5"),
    ({"prompt": "a", "max_tokens": 0}, "invalid sampling value: max_tokens=0"),
    ({"prompt": "a", "max_tokens": -3}, "invalid sampling value: max_tokens=-3"),
    ({"prompt": "a", "top_k": -2}, "invalid sampling value: top_k=-2"),
    ({"prompt": "a", "temprature": 0.5}, "unknown field(s) 'temprature'"),
    ({"id": [1], "prompt": "a"}, "id must be a string or an integer, got an array"),
    ({"id": True, "prompt": "a"}, "id must be a string or an integer, got a boolean"),
    (b'{"prompt": "caf\xe9"}', "not valid UTF-8: byte 0xe9 at column 16"),
])
def test_bad_line_is_rejected_with_its_reason(line, reason):
    err = parse(line, line=6)
    assert isinstance(err, LineError), err
    assert reason in err.reason
    assert str(err).startswith("line 7: ")  # 1-based, as an editor shows it
    assert err.as_json()["line"] == 7


def test_good_lines_parse_with_defaults_and_overrides():
    rec = parse({"prompt": "hi", "temperature": 0.5, "max_tokens": 8}, line=3)
    assert rec == Record(line=3, id=3, prompt="hi", kind="prompt", overrides={"temperature": 0.5, "max_tokens": 8})
    assert rec.engine_prompt() == "hi"
    chat = parse({"id": "c", "messages": [{"role": "user", "content": "hi"}]})
    assert chat.engine_prompt() == {"messages": [{"role": "user", "content": "hi"}]}
    ids = parse({"id": 7, "prompt_token_ids": [1, 2]})
    assert ids.engine_prompt() == {"prompt_token_ids": [1, 2]}
    assert parse("   ") is None  # blank lines are skipped, not errors
    assert parse(b'\xef\xbb\xbf{"prompt": "bom"}', line=0).prompt == "bom"


def test_record_seed_depends_only_on_job_seed_and_line():
    rec = parse({"prompt": "x"}, line=5)
    params = sampling_for(rec, DEFAULTS, job_seed=1)
    assert params.seed == record_seed(1, 5) == sampling_for(rec, DEFAULTS, job_seed=1).seed
    assert len({record_seed(s, line) for s in range(3) for line in range(100)}) == 300
    own = parse({"prompt": "x", "seed": 42}, line=5)
    assert sampling_for(own, DEFAULTS, job_seed=1).seed == 42


def test_scan_reports_every_duplicate_after_the_first_and_chunks_by_line(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [
        {"id": "a", "prompt": "1"}, {"id": "b", "prompt": "2"}, "", {"id": "a", "prompt": "3"},
        {"prompt": "4"}, {"id": 4, "prompt": "5"}, {"id": "a", "prompt": "6"},
    ])
    index = scan_input(path, chunk_size=3, defaults=DEFAULTS)
    assert [(e.line + 1, e.reason) for e in index.errors] == [
        (4, "duplicate id 'a' (first used on line 1); ids must be unique"),
        (6, "duplicate id 4 (first used on line 5); ids must be unique"),  # line 5's default id is 4
        (7, "duplicate id 'a' (first used on line 1); ids must be unique"),
    ]
    assert (index.num_lines, index.num_records, index.num_chunks) == (7, 3, 3)
    got = [[r.id for r in index.read_chunk(k, DEFAULTS)] for k in range(index.num_chunks)]
    assert got == [["a", "b"], [4], []]


BAD_AND_GOOD = [
    {"id": "g1", "prompt": "Hello there"},                      # line 1: good
    '{"id": "x1", "prompt": "unterminated',                      # line 2: malformed JSON
    {"id": "x2"},                                                # line 3: missing prompt
    {"id": "x3", "prompt": ""},                                  # line 4: empty prompt
    {"id": "x4", "prompt": "a", "temperature": -1},              # line 5: temperature < 0
    {"id": "x5", "prompt": "a", "top_p": 0},                     # line 6: top_p outside (0, 1]
    {"id": "x6", "prompt": "a", "top_p": 1.01},                  # line 7
    {"id": "x7", "prompt": "a", "max_tokens": 0},                # line 8: max_tokens <= 0
    {"id": "g1", "prompt": "again"},                             # line 9: duplicate id
    b'{"id": "x9", "prompt": "\xff\xfe"}',                       # line 10: not UTF-8
    {"id": "g2", "messages": [{"role": "user", "content": "Hi"}]},  # line 11: good
    {"id": "long", "prompt_token_ids": [7] * 300},               # line 12: longer than the model's 256
    {"prompt_token_ids": [5, 6, 7], "max_tokens": 2},            # line 13: good, id defaults to 12
]
EXPECTED_ERRORS = [
    (2, None, "malformed JSON"),
    (3, "x2", "missing prompt"),
    (4, "x3", "empty prompt"),
    (5, "x4", "temperature=-1"),
    (6, "x5", "top_p=0"),
    (7, "x6", "top_p=1.01"),
    (8, "x7", "max_tokens=0"),
    (9, "g1", "duplicate id 'g1' (first used on line 1)"),
    (10, None, "not valid UTF-8"),
    (12, "long", "256"),  # the engine's answer: the prompt exceeds the model's maximum length
]


def test_bad_lines_are_skipped_into_errors_jsonl_and_good_records_complete(demo_model, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", BAD_AND_GOOD)
    out = tmp_path / "out"
    r = run_cli(run_args(demo_model, inp, out, "--max-tokens", "3", "--chunk-size", "4"))
    assert r.returncode == EXIT_OK, r.stderr
    assert "skipping 9 bad input line(s)" in r.stderr and "line 2: malformed JSON" in r.stderr
    results = read_jsonl(out / "results.jsonl")
    assert [x["id"] for x in results] == ["g1", "g2", "long", 12]
    lengths = {x["id"]: len(x["output_token_ids"]) for x in results if x["finish_reason"] == "length"}
    assert lengths == {"g1": 3, "g2": 3, 12: 2}  # the flag's max_tokens, or the line's own
    long = results[2]
    assert long["finish_reason"] == "error" and "256" in long["error"] and long["output_token_ids"] == []
    assert set(results[0]) == {"id", "output_text", "output_token_ids", "finish_reason", "stop_reason",
                               "num_prompt_tokens"}
    errors = read_jsonl(out / "errors.jsonl")
    assert [e["line"] for e in errors] == [line for line, _, _ in EXPECTED_ERRORS]
    for e, (line, rid, reason) in zip(errors, EXPECTED_ERRORS):
        assert reason in e["error"], (line, e)
        if rid is not None:
            assert e["id"] == rid
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["records"], summary["errors"]) == (4, 10)
    assert (out / "_SUCCESS").exists()


def test_on_bad_input_fail_stops_before_generating_and_lists_the_lines(demo_model, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", BAD_AND_GOOD[:4])
    out = tmp_path / "out"
    r = run_cli(run_args(demo_model, inp, out, "--on-bad-input", "fail"))
    assert r.returncode == EXIT_BAD_INPUT, r.stderr
    assert "3 bad input line(s)" in r.stderr and "--on-bad-input fail" in r.stderr
    assert "line 3: missing prompt" in r.stderr
    assert [e["line"] for e in read_jsonl(out / "errors.jsonl")] == [2, 3, 4]
    assert not (out / "results.jsonl").exists() and not (out / "parts").exists()


def test_input_without_a_single_valid_record_is_an_error(demo_model, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": 1}, "nope"])
    r = run_cli(run_args(demo_model, inp, tmp_path / "out"))
    assert r.returncode == EXIT_BAD_INPUT
    assert "none of the 2 lines is a valid record" in r.stderr


@pytest.mark.parametrize("flag, value, field", [
    ("--temperature", "-1", "temperature"), ("--top-p", "0", "top_p"), ("--top-p", "1.5", "top_p"),
    ("--max-tokens", "0", "max_tokens"),
])
def test_invalid_sampling_flag_is_a_clear_error(demo_model, tmp_path, flag, value, field):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}])
    r = run_cli(run_args(demo_model, inp, tmp_path / "out", flag, value))
    assert r.returncode == EXIT_JOB_ERROR
    assert field in r.stderr and "invalid job" in r.stderr


# -- job-level problems: in-process run_job, a world of one ----------------------------------------------


@pytest.fixture
def job(demo_model, tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "SLURM_JOB_ID",
                "JOB_COMPLETION_INDEX"):
        monkeypatch.delenv(var, raising=False)
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}])

    def make(**fields) -> JobSpec:
        return JobSpec(**{"model": str(demo_model), "input": str(inp), "output": str(tmp_path / "out"), **fields})

    return make


def run_job_err(spec: JobSpec, capsys) -> tuple[int, str]:
    from tprun.runner.job import run_job

    code = run_job(spec, quiet=True)
    return code, capsys.readouterr().err


def test_empty_input_file(job, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_bytes(b"\n\n")
    code, err = run_job_err(job(input=str(tmp_path / "empty.jsonl")), capsys)
    assert code == EXIT_BAD_INPUT
    assert f"input {tmp_path / 'empty.jsonl'} has no records" in err


def test_missing_input_file(job, tmp_path, capsys):
    code, err = run_job_err(job(input=str(tmp_path / "nope.jsonl")), capsys)
    assert code == EXIT_JOB_ERROR
    assert f"input file {tmp_path / 'nope.jsonl'} does not exist" in err


def test_output_that_cannot_be_a_directory(job, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, err = run_job_err(job(output=str(tmp_path / "file" / "out")), capsys)
    assert code == EXIT_JOB_ERROR
    assert "cannot create output directory" in err and "choose a writable --output" in err
    code, err = run_job_err(job(output=str(tmp_path / "file")), capsys)
    assert code == EXIT_JOB_ERROR and "is not a directory" in err


def test_output_directory_without_write_permission(tmp_path):
    """Root writes anywhere through CAP_DAC_OVERRIDE, so when the tests run as root the check runs with that
    capability dropped (setpriv, util-linux)."""
    import shutil

    out = tmp_path / "locked"
    out.mkdir()
    os.chmod(out, 0o555)
    code = ("from tprun.runner.preflight import check_output, JobError\n"
            f"try:\n    check_output({str(out)!r})\nexcept JobError as e:\n    print(e)\n")
    cmd = [sys.executable, "-c", code]
    if os.geteuid() == 0:
        assert shutil.which("setpriv"), "setpriv (util-linux) is needed to drop root's override"
        caps = "-dac_override,-dac_read_search"
        cmd = ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", "--", *cmd]
    r = subprocess.run(cmd, check=False, env=base_env(), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert f"output directory {out} is not writable: Permission denied" in r.stdout, r.stderr


def test_missing_model_directory(job, tmp_path, capsys):
    code, err = run_job_err(job(model=str(tmp_path / "no-model")), capsys)
    assert code == EXIT_JOB_ERROR
    assert f"model directory {tmp_path / 'no-model'} does not exist" in err


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[: len(b) // 2], "ends at byte"),           # truncated download
    (lambda b: b[:8] + b"\x00" * 16 + b[24:], "header is not JSON"),
    (lambda b: b[:4], "shorter than a safetensors header"),
])
def test_corrupt_safetensors(job, demo_model, tmp_path, capsys, damage, message):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(demo_model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    code, err = run_job_err(job(model=str(broken)), capsys)
    assert code == EXIT_JOB_ERROR
    assert f"{weights} is corrupt" in err and message in err


def test_world_size_not_tp_times_dp(job, capsys):
    code, err = run_job_err(job(parallel={"tensor_parallel_size": 2, "data_parallel_size": 2}), capsys)
    assert code == EXIT_JOB_ERROR
    assert "tp(2) * dp(2) = 4 but local started WORLD_SIZE(1)" in err


def test_job_error_stops_each_rank_without_waiting_for_the_others(demo_model, tmp_path):
    """Only rank 1 of a 2-rank world is started: a rendezvous would wait for rank 0 until its timeout."""
    args = run_args(demo_model, tmp_path / "missing.jsonl", tmp_path / "out", "--tp", "2")
    t0 = time.monotonic()
    ranks = launch_ranks(2, args, tmp_path / "logs")
    ranks.procs[0].kill()
    ranks.wait(timeout=60)
    assert ranks.codes[1] == EXIT_JOB_ERROR
    assert time.monotonic() - t0 < 60  # not the rendezvous timeout (300 s); rank 1 tries rank 0 for 15 s
    assert "missing.jsonl does not exist" in ranks.output(1)


def _can_unshare() -> bool:
    r = subprocess.run(["unshare", "--mount", "true"], check=False, capture_output=True, timeout=30)
    return r.returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="needs a private mount namespace (unshare --mount, root)")
@pytest.mark.parametrize("blind", ["input", "output"])
def test_ranks_that_do_not_share_files_fail_together(demo_model, tmp_path, blind):
    """Rank 1 runs as if on another node without the shared filesystem: it sees other input bytes, or an
    output directory that is not rank 0's. Every rank stops with the same clear error."""
    shared = tmp_path / "shared"
    shared.mkdir()
    inp = write_jsonl(shared / "in.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    other = tmp_path / "other"
    other.mkdir()
    write_jsonl(other / "in.jsonl", [{"prompt": "a"}, {"prompt": "c"}])
    out = tmp_path / "out"
    out.mkdir()
    wrap = {1: private_dir(shared, fill_from=other) if blind == "input" else private_dir(out)}
    ranks = launch_ranks(2, run_args(demo_model, inp, out, "--tp", "2"), tmp_path / "logs", wrap=wrap)
    ranks.wait(timeout=120)
    assert ranks.codes == [EXIT_JOB_ERROR, EXIT_JOB_ERROR], ranks.output()
    for r in range(2):
        text = ranks.output(r)
        assert "rank(s) [1] (on" in text
        assert ("read a different input, model or spec than rank 0" in text if blind == "input"
                else "--output must be a directory shared by all nodes" in text), text


def test_summary_counts_prompt_tokens_served_from_the_prefix_cache(demo_model, tmp_path):
    # Four prompts share their first 40 tokens: the first computes them, each of the others reuses the
    # two full 16-token blocks (a hit never covers a prompt's last token, and never a partial block).
    shared = list(range(20, 60))
    rows = [{"id": i, "prompt_token_ids": shared + [100 + i] * 5} for i in range(4)]
    out = tmp_path / "out"
    r = run_cli(run_args(demo_model, write_jsonl(tmp_path / "in.jsonl", rows), out, "--max-tokens", "2"))
    assert r.returncode == EXIT_OK, r.stderr
    assert json.loads((out / "summary.json").read_text())["cached_prompt_tokens"] == 3 * 32
