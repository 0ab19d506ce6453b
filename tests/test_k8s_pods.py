"""deploy/job.yaml run as local pods (tests/k8s_pods.py) gives torchrun's results token for token.

Each pod has its own network namespace, IP and hostname `<job>-<i>`, runs the container command and
env straight from the manifest as uid 1000 on a read-only root, and finds pod 0 by its DNS name.
No CNI enforces the manifest's NetworkPolicy here; instead every TCP listener and connection the pods
had while the job ran is checked against it (tests/netpol.py evaluates the policy), so a rank that
listens or connects where the policy would drop it fails the test.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.k8s_pods import LocalPods, Socket, available
from tests.netpol import allowed, job_pods
from tests.runner_harness import read_jsonl, run_torchrun
from tprun.cluster.k8s_render import render_manifests
from tprun.cluster.options import EPHEMERAL_PORTS
from tprun.config import JobSpec

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


class SocketSampler(threading.Thread):
    """Every 50 ms, the TCP sockets of every pod's network namespace, until stopped."""

    def __init__(self, pods: LocalPods) -> None:
        super().__init__(daemon=True)
        self.pods, self.done, self.seen = pods, threading.Event(), {p.index: set() for p in pods.pods}

    def run(self) -> None:
        while not self.done.wait(0.05):
            for index, sockets in self.pods.tcp_sockets().items():
                self.seen[index] |= sockets

    def stop(self) -> dict[int, set[Socket]]:
        self.done.set()
        self.join(timeout=10)
        return self.seen


def check_traffic_against_policy(docs: list[dict], ips: list[str], seen: dict[int, set[Socket]]) -> set:
    """Every non-loopback listener, and every connection between pods, the policy admits; returns the
    connections as (source index, destination index, port)."""
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert policies, "deploy/job.yaml has no NetworkPolicy"
    pods = job_pods(docs, ips)
    index_of = {ip: i for i, ip in enumerate(ips)}
    listeners = {(i, s.local_port) for i, socks in seen.items() for s in socks
                 if s.state == "LISTEN" and not s.local_ip.startswith("127.") and s.local_ip != "::1"}
    connections = set()
    for i, socks in seen.items():
        for s in socks:
            j = index_of.get(s.remote_ip)
            if s.state != "ESTABLISHED" or j is None or j == i:
                continue
            connections.add((j, i, s.local_port) if (i, s.local_port) in listeners else (i, j, s.remote_port))
    for i, port in listeners:
        for j in set(index_of.values()) - {i}:
            assert allowed(policies, pods[j], pods[i], "TCP", port), f"pod {i} listens on {port}: policy drops it"
    for src, dst, port in connections:
        assert allowed(policies, pods[src], pods[dst], "TCP", port), f"pod {src} -> pod {dst}:{port} is dropped"
    return connections


def test_indexed_job_pods_match_torchrun_even_when_pod0_dns_is_20s_late(tmp_path, demo_model, torchrun_results):
    ws = workspace(tmp_path, demo_model)
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "job.yaml").read_text()))
    with LocalPods(docs, {"workspace": ws}, tmp_path / "pods") as pods:
        t0 = time.monotonic()
        pods.start(withhold_dns={0})
        time.sleep(DNS_DELAY_S)
        assert all(p.proc.poll() is None for p in pods.pods), pods.logs()  # still waiting, not failed
        sampler = SocketSampler(pods)
        sampler.start()
        pods.publish(0)
        try:
            codes = pods.wait(timeout=300)
        finally:
            seen = sampler.stop()
        elapsed = time.monotonic() - t0
        logs = pods.logs()
        ips = [p.ip for p in pods.pods]
    assert codes == [0, 0], logs
    connections = check_traffic_against_policy(docs, ips, seen)
    master = int(next(e["value"] for e in docs[-1]["spec"]["template"]["spec"]["containers"][0]["env"]
                      if e["name"] == "MASTER_PORT"))
    assert (1, 0, master) in connections  # rank 1 reached rank 0's store, as the policy admits
    low, high = EPHEMERAL_PORTS
    assert any(low <= port <= high for _, _, port in connections)  # and gloo's pairs, on kernel-chosen ports
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


def test_leader_worker_set_of_two_groups_of_two_pods_matches_torchrun(tmp_path, demo_model, torchrun_results):
    """--groups independent: a LeaderWorkerSet of 2 groups x 2 pods (TP=2 each), every group its own
    world found through LWS_LEADER_ADDRESS; they share only the output volume."""
    ws = workspace(tmp_path, demo_model)
    spec = JobSpec.from_yaml(ROOT / "examples" / "job.yaml").model_copy(deep=True)
    spec.parallel.data_parallel_size, spec.parallel.groups, spec.resources.nodes = 2, "independent", 4
    spec.chunk_size = 2
    docs = render_manifests(spec)
    assert [d["kind"] for d in docs] == ["ConfigMap", "NetworkPolicy", "LeaderWorkerSet"]
    with LocalPods(docs, {"workspace": ws}, tmp_path / "pods") as pods:
        assert [p.hostname for p in pods.pods] == [] and pods.lws is not None
        pods.start()
        assert [p.hostname for p in pods.pods] == ["tprun-demo-0", "tprun-demo-0-1", "tprun-demo-1", "tprun-demo-1-1"]
        sampler = SocketSampler(pods)
        sampler.start()
        try:
            codes = pods.wait(timeout=300)
        finally:
            seen = sampler.stop()
        logs = pods.logs()
        ips = [p.ip for p in pods.pods]
    assert codes == [0, 0, 0, 0], logs
    connections = check_traffic_against_policy(docs, ips, seen)
    # each group's ranks talk within the group (worker -> its leader's store), never across groups
    assert (1, 0, spec.kubernetes.master_port) in connections and (3, 2, spec.kubernetes.master_port) in connections
    assert not any({src // 2, dst // 2} == {0, 1} for src, dst, _ in connections)
    out = ws / "out" / "tprun-demo"
    assert read_jsonl(out / "results.jsonl") == torchrun_results
    groups = json.loads((out / "summary.json").read_text())["groups"]
    assert {g["group"] for g in groups} <= {0, 1} and sum(g["chunks"] for g in groups) == 4  # 8 prompts / 2
