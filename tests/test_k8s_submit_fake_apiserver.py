"""`tprun.submit(spec, backend="kubernetes")` against a FAKE API server (no real one can run here).

The fake (tests/k8s_fake_apiserver.py) validates every body as the API server would and records
the requests; the tests play the Job controller by setting Job status and adding pods.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kubernetes import client

import tprun
from tests.k8s_fake_apiserver import FakeApiServer
from tprun.cluster.k8s_render import render_manifests
from tprun.cluster.k8s_submit import SubmitError
from tprun.config import JobSpec

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "job.yaml"
NS, NAME = "default", "tprun-demo"


@pytest.fixture
def fake():
    server = FakeApiServer().start()
    yield server
    server.stop()


@pytest.fixture
def api(fake):
    return client.ApiClient(client.Configuration(host=fake.url))


def spec() -> JobSpec:
    return JobSpec.from_yaml(EXAMPLE)


def test_submit_creates_the_rendered_configmap_service_networkpolicy_and_job(fake, api):
    handle = tprun.submit(spec(), backend="kubernetes", api_client=api)
    assert handle.job_id == f"{NS}/{NAME}"
    # Exactly what `tprun render k8s` prints, in dependency order, each accepted by the (fake) API.
    assert fake.created() == render_manifests(spec())
    assert [r.path for r in fake.requests if r.method == "POST"] == [
        f"/api/v1/namespaces/{NS}/configmaps", f"/api/v1/namespaces/{NS}/services",
        f"/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies", f"/apis/batch/v1/namespaces/{NS}/jobs"]
    # The Job owns its ConfigMap, Service and NetworkPolicy, so `kubectl delete job` cleans up everything.
    job_uid = fake.objects[("jobs", NS, NAME)]["metadata"]["uid"]
    for plural, name in (("configmaps", f"{NAME}-spec"), ("services", NAME), ("networkpolicies", NAME)):
        owners = fake.objects[(plural, NS, name)]["metadata"]["ownerReferences"]
        assert [(o["kind"], o["name"], o["uid"]) for o in owners] == [("Job", NAME, job_uid)]


def test_status_follows_the_job_conditions(fake, api):
    handle = tprun.submit(spec(), backend="kubernetes", api_client=api)
    assert handle.status() == "PENDING"
    fake.set_job_status(NS, NAME, {"active": 2, "ready": 0})
    assert handle.status() == "PENDING"  # pods created, still pulling images
    fake.set_job_status(NS, NAME, {"active": 2, "ready": 2})
    assert handle.status() == "RUNNING"
    fake.set_job_status(NS, NAME, {"succeeded": 2, "conditions": [
        {"type": "SuccessCriteriaMet", "status": "True"}, {"type": "Complete", "status": "True"}]})
    assert handle.status() == "COMPLETED"
    assert handle.wait(timeout=5, poll_s=0.05) == "COMPLETED"


def test_failed_job_reports_failed(fake, api):
    handle = tprun.submit(spec(), backend="kubernetes", api_client=api)
    fake.set_job_status(NS, NAME, {"failed": 1, "conditions": [
        {"type": "FailureTarget", "status": "True", "reason": "PodFailurePolicy"},
        {"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}]})
    assert handle.wait(timeout=5, poll_s=0.05) == "FAILED"


def test_wait_times_out_on_a_job_that_does_not_finish(fake, api):
    handle = tprun.submit(spec(), backend="kubernetes", api_client=api)
    fake.set_job_status(NS, NAME, {"active": 2, "ready": 2})
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="still RUNNING"):
        handle.wait(timeout=0.5, poll_s=0.05)
    assert time.monotonic() - t0 < 5


def test_logs_come_from_every_pod_in_index_order(fake, api):
    handle = tprun.submit(spec(), backend="kubernetes", api_client=api)
    job = fake.objects[("jobs", NS, NAME)]
    fake.add_pod(NS, job, 1, "Running", "rank 1 ready\n")
    fake.add_pod(NS, job, 0, "Running", "rank 0 ready\nwrote results.jsonl\n")
    logs = handle.logs()
    assert logs.index("(index 0)") < logs.index("rank 0 ready") < logs.index("(index 1)") < logs.index("rank 1")
    assert "wrote results.jsonl" in logs
    log_reads = [r for r in fake.requests if r.path.endswith("/log")]
    assert {r.query["container"] for r in log_reads} == {"tprun"}


def test_cancel_deletes_the_job_in_the_foreground_and_its_objects(fake, api):
    handle = tprun.submit(spec(), backend="kubernetes", api_client=api)
    job = fake.objects[("jobs", NS, NAME)]
    fake.add_pod(NS, job, 0, "Running", "")
    fake.set_job_status(NS, NAME, {"active": 2, "ready": 2})
    handle.cancel()
    deletes = [(r.path.rsplit("/", 2)[-2], r.query.get("propagationPolicy")) for r in fake.requests
               if r.method == "DELETE"]
    assert deletes == [("jobs", "Foreground"), ("services", "Background"), ("networkpolicies", "Background"),
                       ("configmaps", "Background")]
    assert handle.status() == "CANCELLED"  # the Job object lingers while its pods go, marked deleting
    assert not [k for k in fake.objects if k[0] in ("pods", "services", "networkpolicies", "configmaps")]
    del fake.objects[("jobs", NS, NAME)]  # the garbage collector finishes
    assert handle.status() == "CANCELLED"
    handle.cancel()  # cancelling again is harmless


def test_resubmitting_a_live_job_is_a_clear_error_and_keeps_it(fake, api):
    tprun.submit(spec(), backend="kubernetes", api_client=api)
    before = dict(fake.objects)
    with pytest.raises(SubmitError) as e:
        tprun.submit(spec(), backend="kubernetes", api_client=api)
    assert f"ConfigMap {NS}/{NAME}-spec already exists" in str(e.value)
    assert f"kubectl delete -n {NS} job/{NAME}" in str(e.value)
    assert fake.objects == before  # the running job's objects are not touched


def test_refused_job_rolls_back_what_was_created(fake, api):
    fake.fail("POST", "jobs", 403, "Forbidden",
              'jobs.batch is forbidden: User "ci" cannot create resource "jobs" in API group "batch"')
    with pytest.raises(SubmitError) as e:
        tprun.submit(spec(), backend="kubernetes", api_client=api)
    assert f"not allowed to create Job {NS}/{NAME}" in str(e.value)
    assert 'User "ci" cannot create resource "jobs"' in str(e.value)
    assert fake.objects == {}  # the ConfigMap, Service and NetworkPolicy made before were deleted again


def test_admission_rejection_is_reported_with_the_api_message(fake, api):
    fake.fail("POST", "jobs", 422, "Invalid", 'exceeded quota: gpu-quota, requested: requests.nvidia.com/gpu=8')
    with pytest.raises(SubmitError, match=r"rejected Job default/tprun-demo \(HTTP 422\): exceeded quota"):
        tprun.submit(spec(), backend="kubernetes", api_client=api)
    assert fake.objects == {}


def test_unreachable_api_server_is_a_clear_error(fake):
    port = fake.httpd.server_address[1]
    fake.stop()
    dead = client.Configuration(host=f"http://127.0.0.1:{port}")
    dead.retries = 0
    with pytest.raises(SubmitError, match="could not reach the API server to create ConfigMap"):
        tprun.submit(spec(), backend="kubernetes", api_client=client.ApiClient(dead))
    fake.start()  # for the fixture's stop()


def test_cli_submit_uses_the_kubeconfig(fake, tmp_path):
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(f"""
apiVersion: v1
kind: Config
clusters: [{{name: fake, cluster: {{server: "{fake.url}"}}}}]
users: [{{name: ci, user: {{token: not-a-secret}}}}]
contexts: [{{name: fake, context: {{cluster: fake, user: ci}}}}]
current-context: fake
""")
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    r = subprocess.run([sys.executable, "-m", "tprun", "submit", "k8s", str(EXAMPLE)], env=env, capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert f"submitted k8s job {NS}/{NAME}" in r.stdout
    assert fake.created() == render_manifests(spec())
