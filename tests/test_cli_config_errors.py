"""A job that is configured wrong ends `tprun run` with exit 2 and one line saying what to fix, not a
traceback: above all an `--engine KEY=VALUE` whose KEY is a job field (`--engine dtype=float32`)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.procs import ROOT
from tprun import cli
from tprun.config import JobSpec

RUN = ["run", "--model", "m", "--input", "i.jsonl", "--output", "o"]
EXIT_CONFIG = 2


def test_engine_dtype_float32_exits_2_with_one_line():
    """The report: this ended in a TypeError traceback."""
    r = subprocess.run([sys.executable, "-m", "tprun", *RUN, "--engine", "dtype=float32"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == EXIT_CONFIG
    assert r.stderr == ("tprun run: invalid job: engine: 'dtype' is a job field, not an engine setting: set it as "
                        "the spec's 'dtype:' or with --dtype, not under engine (--engine)\n")


@pytest.mark.parametrize("key", sorted(JobSpec.model_fields))
def test_every_engine_key_that_is_a_job_field_exits_2_naming_it(key, capsys):
    assert cli.main([*RUN, "--engine", f"{key}=1"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"engine: {key!r} is a job field, not an engine setting" in err, err


@pytest.mark.parametrize(("args", "message"), [
    (["--engine", "blocksize=16"], "engine: 'blocksize' is not an engine setting; the settings are seed, "),
    (["--engine", "block_size=many"], "engine: block_size: Input should be a valid integer"),
    (["--engine", "block_size=0"], "engine: block_size: Input should be greater than or equal to 1"),
    (["--engine", "device=tpu"], "engine: device: Input should be 'auto', 'cpu' or 'cuda'"),
    (["--engine", "block_size=[1"], "engine: block_size: Input should be a valid integer"),  # not even YAML
    (["--engine", "block_size"], "error: --engine takes KEY=VALUE, got 'block_size'"),
    (["--tp", "0"], "invalid job: parallel.tensor_parallel_size: Input should be greater than or equal to 1"),
    (["--chunk-size", "0"], "invalid job: chunk_size: Input should be greater than or equal to 1"),
])
def test_other_config_errors_exit_2_with_one_line(args, message, capsys):
    assert cli.main([*RUN, *args]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_missing_flags_and_a_broken_spec_file_exit_2_with_one_line(tmp_path, capsys):
    assert cli.main(["run", "--model", "m"]) == EXIT_CONFIG
    assert capsys.readouterr().err == ("tprun run: error: missing --input, --output (give them as flags or in the "
                                       "spec file)\n")
    spec = tmp_path / "job.yaml"
    spec.write_text("model: m\ninput: [i.jsonl\n")
    for argv in (["run", str(spec)], ["render", "slurm", str(spec)], ["submit", "k8s", str(spec)]):
        assert cli.main(argv) == EXIT_CONFIG
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"job spec {spec} is not valid YAML" in err, err
