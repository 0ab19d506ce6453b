"""A job spec is untrusted text: what would inject a line into the sbatch script (or an object into a
manifest) is refused by `tprun render` and by `tprun submit`, naming the field, before anything is
written or sent to Slurm.

Submit runs against a stand-in `sbatch` on PATH that records being called (no Slurm runs here): the
refused specs never reach it, and a valid spec does (so the stand-in would have seen a leak).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tprun import cli
from tprun.cluster.k8s_render import render_manifests
from tprun.cluster.slurm_render import render_sbatch
from tprun.cluster.slurm_submit import submit_slurm
from tprun.config import JobSpec

ROOT = Path(__file__).resolve().parents[1]
BASE = {"name": "inj", "model": "/m", "input": "/m/in.jsonl", "output": "out/inj",
        "kubernetes": {"volumes": [{"name": "m", "mount_path": "/m", "pvc": "m", "read_only": True},
                                   {"name": "w", "mount_path": "/w", "pvc": "w"}], "working_dir": "/w"}}
PAYLOAD = "touch /tmp/pwned"
FAKE_SBATCH = "#!/bin/sh\necho \"$@\" >> \"$SBATCH_LOG\"\necho 'Submitted batch job 4242'\n"

# (field path, value, what the error names)
ATTEMPTS = [
    *((f"slurm.{f}", f"x{sep}{PAYLOAD}", f"slurm.{f}") for f in ("partition", "account", "time", "chdir", "qos",
                                                                  "constraint") for sep in ("\n", "\r")),
    *(("name", f"inj{sep}{PAYLOAD}", "name") for sep in ("\n", "\r")),
    *(("slurm.extra_sbatch", [f"--exclusive{sep}{PAYLOAD}"], "slurm.extra_sbatch.0") for sep in ("\n", "\r")),
    ("slurm.extra_sbatch", ["--exclusive --partition=other"], "slurm.extra_sbatch.0"),  # two options in one
    ("slurm.extra_sbatch", ["--comment=a", "--mail-type=END --qos=high"], "slurm.extra_sbatch.1"),
    ("slurm.srun_args", ["--cpu-bind=cores --overlap"], "slurm.srun_args.0"),
    ("slurm.setup", [f"module load x\n{PAYLOAD}"], "slurm.setup.0"),
    ("slurm.python", "python3\x00", "slurm.python"),
    ("slurm.signal", "USR1@90\n", "slurm.signal"),
    ("resources.memory", "4G\n", "resources.memory"),
    ("model", "/m\x1b[2J", "model"),
    ("input", "/m/in\u2028.jsonl", "input"),
    ("output", "out\x7f", "output"),
    ("kubernetes.image", f"tprun:1\n{PAYLOAD}", "kubernetes.image"),
    ("kubernetes.working_dir", "/w\x85", "kubernetes.working_dir"),
]
IDS = [f"{path}-{value!r}"[:60] for path, value, _ in ATTEMPTS]


def with_value(path: str, value) -> dict:
    data = yaml.safe_load(yaml.safe_dump(BASE))
    *head, last = path.split(".")
    target = data
    for key in head:
        target = target.setdefault(key, {})
    target[last] = value
    return data


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, body in (("sbatch", FAKE_SBATCH), ("srun", "#!/bin/sh\nexit 1\n")):  # submitit looks for srun
        (bindir / name).write_text(body)
        (bindir / name).chmod(stat.S_IRWXU)
    log = tmp_path / "sbatch.log"
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("SBATCH_LOG", str(log))
    monkeypatch.chdir(tmp_path)
    return log


def _spec_file(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))  # a real YAML serializer: the control character arrives intact
    assert yaml.safe_load(path.read_text()) == data
    return path


@pytest.mark.parametrize(("path", "value", "field"), ATTEMPTS, ids=IDS)
def test_injection_is_refused_by_render_and_submit_naming_the_field(tmp_path, fake_sbatch, capsys, path, value,
                                                                    field):
    spec = _spec_file(tmp_path, with_value(path, value))
    for argv in (["render", "slurm", str(spec)], ["render", "k8s", str(spec)], ["submit", "slurm", str(spec)],
                 ["submit", "k8s", str(spec)]):
        assert cli.main(argv) == 2, argv
        out, err = capsys.readouterr()
        assert out == "", argv  # nothing rendered
        assert err.count("\n") == 1 and f"invalid job: {field}: " in err, (argv, err)
    assert not fake_sbatch.exists()  # Slurm was never asked
    assert not (tmp_path / "out").exists() and not (tmp_path / "out" / "inj.submitit").exists()


def test_valid_spec_reaches_the_stand_in_sbatch_from_a_private_folder(tmp_path, fake_sbatch, capsys, monkeypatch):
    """The control for the test above: the same path with a valid spec does call sbatch. And `--output .`
    (here `output: .`) works: submitit's folder is `<cwd>.submitit`, beside it, created 0700."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    spec = _spec_file(tmp_path, {**with_value("slurm.extra_sbatch", ["--exclusive", "--mail-type=END,FAIL"]),
                                 "output": "."})
    for target in ("slurm", "k8s"):
        assert cli.main(["render", target, str(spec)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert cli.main(["submit", "slurm", str(spec)]) == 0, capsys.readouterr().err
    assert "submitted slurm job 4242" in capsys.readouterr().out
    script = Path(fake_sbatch.read_text().split()[-1]).read_text()
    assert "#SBATCH --exclusive\n" in script and "#SBATCH --mail-type=END,FAIL\n" in script
    folder = tmp_path / "work.submitit"
    assert folder.is_dir() and stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_group_writable_submitit_folder_is_refused(tmp_path, fake_sbatch):
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(0o775)
    with pytest.raises(PermissionError, match=rf"submitit folder {folder} is group/world-writable \(mode 0775\)"):
        submit_slurm(JobSpec.model_validate(BASE), folder=folder)
    assert not fake_sbatch.exists()


def test_a_list_changed_in_place_is_validated_again_by_render_and_submit(tmp_path, fake_sbatch):
    """pydantic validates assignments, not appends: render and submit validate the whole spec again."""
    spec = JobSpec.model_validate(BASE)
    spec.slurm.extra_sbatch.append(f"--exclusive\n{PAYLOAD}")
    for call in (lambda: render_sbatch(spec, "s.yaml"), lambda: render_manifests(spec),
                 lambda: submit_slurm(spec, folder=tmp_path / "f")):
        with pytest.raises(ValueError, match="slurm.extra_sbatch.0"):
            call()
    assert not fake_sbatch.exists()


def test_spec_path_with_a_newline_is_refused(tmp_path):
    with pytest.raises(ValueError, match="the job spec's path"):
        render_sbatch(JobSpec.model_validate(BASE), f"s.yaml\n{PAYLOAD}")


@pytest.mark.parametrize(("path", "value", "rule"), [
    ("kubernetes.namespace", "Team_A", "must be a DNS-1123 label"),
    ("kubernetes.namespace", "ns\n", "must be a DNS-1123 label"),
    ("kubernetes.service_account", "Runner!", "must be a DNS-1123 subdomain"),
    ("kubernetes.node_selector", {"gpu type": "h100"}, "must be a Kubernetes qualified name"),
    ("kubernetes.node_selector", {"gpu": "h100 80gb"}, "must be a Kubernetes label value"),
    ("kubernetes.gpu_resource", "nvidia.com/gpu\n", "must be a Kubernetes qualified name"),
    ("kubernetes.volumes", [{"name": "Out_1", "mount_path": "/o", "pvc": "o"}], "must be a DNS-1123 label"),
    ("kubernetes.volumes", [{"name": "o", "mount_path": "/o", "pvc": "O"}], "must be a DNS-1123 subdomain"),
    ("kubernetes.tolerations", [{"key": "gpu\nx", "operator": "Exists"}], "control character"),
    ("name", "Llama_70B", "must be a DNS-1123 label of at most 42 characters"),
    ("name", "a" * 43, "must be a DNS-1123 label of at most 42 characters"),
])
def test_kubernetes_names_follow_the_api_rules_named_in_the_error(tmp_path, capsys, path, value, rule):
    spec = _spec_file(tmp_path, with_value(path, value))
    assert cli.main(["render", "k8s", str(spec)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"invalid job: {path}" in err and rule in err, err


def test_cli_exit_status_is_2_with_one_line():
    r = subprocess.run([sys.executable, "-m", "tprun", "render", "slurm", "/dev/stdin"], cwd=ROOT,
                       input=yaml.safe_dump(with_value("slurm.partition", f"gpu\n{PAYLOAD}")), capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("tprun render: invalid job: slurm.partition: 'gpu\\ntouch /tmp/pwned' contains "
                               "the control character '\\n'"), r.stderr
    assert r.stderr.count("\n") == 1


def test_stop_strings_are_data_and_reach_the_pods_intact():
    """Control characters are refused where they would end up in a script or an object's field, not in
    sampling data: stop strings with newlines travel through the ConfigMap unchanged."""
    data = {**BASE, "sampling": {"stop": ["\n", "a\r\nb", " x\n"]}}
    spec = JobSpec.model_validate(data)
    configmap = render_manifests(spec)[0]
    assert JobSpec.model_validate(yaml.safe_load(configmap["data"]["job.yaml"])) == spec
