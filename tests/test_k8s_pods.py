"""deploy/job.yaml run as local pods (tests/k8s_pods.py) gives torchrun's results token for token.

Each pod has its own network namespace, IP and hostname `<job>-<i>`, runs the container command and
env straight from the manifest as uid 1000 on a read-only root, and finds pod 0 by its DNS name.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import yaml

from tests.k8s_pods import LocalPods, available
from tests.runner_harness import read_jsonl, run_torchrun
from tprun.config import JobSpec
from tprun.launchers.k8s_render import render_manifests

ROOT = Path(__file__).resolve().parents[1]
DNS_DELAY_S = 20.0

pytestmark = [pytest.mark.slow, pytest.mark.skipif(available() is not None, reason=str(available()))]


def workspace(tmp_path: Path, demo_model: Path) -> Path:
    """The PVC the example mounts at /workspace: the demo model and the prompts, as examples/job.yaml names them."""
    ws = tmp_path / "workspace"
    shutil.copytree(demo_model, ws / "demo-model")
    (ws / "examples").mkdir()
    shutil.copy(ROOT / "examples" / "prompts.jsonl", ws / "examples" / "prompts.jsonl")
    return ws


@pytest.fixture(scope="module")
def torchrun_results(tmp_path_factory, demo_model) -> list[dict]:
    """The reference: the same spec under torchrun, 2 ranks on this host."""
    out = tmp_path_factory.mktemp("torchrun") / "out"
    r = run_torchrun(2, [str(ROOT / "examples" / "job.yaml"), "--model", str(demo_model),
                         "--input", str(ROOT / "examples" / "prompts.jsonl"), "--output", str(out), "--quiet"])
    assert r.returncode == 0, r.stderr[-4000:]
    return read_jsonl(out / "results.jsonl")


def test_indexed_job_pods_match_torchrun_even_when_pod0_dns_is_20s_late(tmp_path, demo_model, torchrun_results):
    ws = workspace(tmp_path, demo_model)
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "job.yaml").read_text()))
    with LocalPods(docs, {"workspace": ws}, tmp_path / "pods") as pods:
        t0 = time.monotonic()
        pods.start(withhold_dns={0})
        time.sleep(DNS_DELAY_S)
        assert all(p.proc.poll() is None for p in pods.pods), pods.logs()  # still waiting, not failed
        pods.publish(0)
        codes = pods.wait(timeout=300)
        elapsed = time.monotonic() - t0
        logs = pods.logs()
    assert codes == [0, 0], logs
    assert elapsed >= DNS_DELAY_S
    assert logs.count("tprun-demo-0.tprun-demo.default.svc does not resolve yet") == 2, logs
    results = read_jsonl(ws / "out" / "tprun-demo" / "results.jsonl")
    assert len(results) == 8 and all(r["output_token_ids"] for r in results)
    assert results == torchrun_results


def test_two_processes_in_one_pod_match_torchrun(tmp_path, demo_model, torchrun_results):
    """resources.procs_per_node: 2 puts both TP ranks in one pod, started by the fan-out."""
    ws = workspace(tmp_path, demo_model)
    spec = JobSpec.from_yaml(ROOT / "examples" / "job.yaml").model_copy(deep=True)
    spec.resources.nodes, spec.resources.procs_per_node = 1, 2
    docs = render_manifests(spec)
    with LocalPods(docs, {"workspace": ws}, tmp_path / "pods") as pods:
        pods.start()
        codes = pods.wait(timeout=300)
        logs = pods.logs()
    assert codes == [0], logs
    assert read_jsonl(ws / "out" / "tprun-demo" / "results.jsonl") == torchrun_results
