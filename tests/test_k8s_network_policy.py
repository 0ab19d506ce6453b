"""What the rendered NetworkPolicy admits and refuses, EVALUATED by tests/netpol.py, not enforced: no CNI
runs in CI. The pods carry the labels the Job controller gives them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.netpol import Pod, allowed, job_pods
from tprun.cluster.k8s_render import render_manifests
from tprun.config import JobSpec

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "job.yaml"
SPECS = ["example", "master-port-23456"]


def rendered(which: str) -> tuple[list[dict], list[Pod], int]:
    spec = JobSpec.from_yaml(EXAMPLE)
    if which == "master-port-23456":
        spec = spec.model_copy(update={"kubernetes": spec.kubernetes.model_copy(update={"master_port": 23456})})
    docs = render_manifests(spec)
    return [d for d in docs if d["kind"] == "NetworkPolicy"], job_pods(docs), spec.kubernetes.master_port


def _others(rank0: Pod) -> dict[str, Pod]:
    ns = rank0.namespace
    same_labels_no_job = {k: v for k, v in rank0.labels.items() if k.startswith("app.kubernetes.io/")}
    return {
        "a pod of another tprun job": Pod("other-0", ns, "10.0.0.50", {
            **same_labels_no_job, "app.kubernetes.io/instance": "other", "batch.kubernetes.io/job-name": "other"}),
        "a pod with the job's app labels but made by no Job": Pod("fake", ns, "10.0.0.51", same_labels_no_job),
        "a pod with all the job's labels in another namespace": Pod("twin-0", "team-b", "10.0.1.10",
                                                                     dict(rank0.labels)),
        "any other pod of the namespace": Pod("web", ns, "10.0.0.60", {"app": "web"}),
    }


DNS = {"CoreDNS pod": Pod("coredns-1", "kube-system", "10.0.2.2", {"k8s-app": "kube-dns"}),
       "node-local DNS cache": Pod("node-local-dns", "kube-system", "169.254.20.10", {})}


@pytest.mark.parametrize("which", SPECS)
def test_rendered_policy_evaluated_admits_what_the_ranks_need(which):
    policies, (rank0, rank1), master = rendered(which)
    assert len(policies) == 1
    assert allowed(policies, rank1, rank0, "TCP", master)  # TCPStore: every rank to rank 0
    for port in (32768, 45000, 60999):  # gloo's listeners, bound to port 0: the pods' ephemeral range
        assert allowed(policies, rank0, rank1, "TCP", port) and allowed(policies, rank1, rank0, "TCP", port)
    for server in DNS.values():
        for protocol in ("UDP", "TCP"):
            assert allowed(policies, rank1, server, protocol, 53), (server.name, protocol)
    # The range the policy admits is the one the pods pin with their sysctl.
    job = next(d for d in render_manifests(JobSpec.from_yaml(EXAMPLE)) if d["kind"] == "Job")
    sysctls = job["spec"]["template"]["spec"]["securityContext"]["sysctls"]
    assert sysctls == [{"name": "net.ipv4.ip_local_port_range", "value": "32768 60999"}]


@pytest.mark.parametrize("which", SPECS)
@pytest.mark.parametrize("who", ["a pod of another tprun job", "a pod with the job's app labels but made by no Job",
                                 "a pod with all the job's labels in another namespace",
                                 "any other pod of the namespace"])
def test_rendered_policy_evaluated_refuses_other_pods_the_store_and_gloo_ports(which, who):
    policies, (rank0, rank1), master = rendered(which)
    outsider = _others(rank0)[who]
    for port in (master, 32768, 45000):
        assert not allowed(policies, outsider, rank0, "TCP", port), port
        assert not allowed(policies, rank0, outsider, "TCP", port), port  # nor do ranks connect out to it
    assert allowed([], outsider, rank0, "TCP", master)  # the control: without the policy it would get in


@pytest.mark.parametrize("which", SPECS)
def test_rendered_policy_evaluated_refuses_other_ports_protocols_and_destinations(which):
    policies, (rank0, rank1), master = rendered(which)
    for protocol, port in (("UDP", master), ("TCP", 22), ("TCP", 8080), ("TCP", 32767), ("TCP", 61000),
                           ("UDP", 40000), ("SCTP", master)):
        assert not allowed(policies, rank1, rank0, protocol, port), (protocol, port)
    internet = Pod("example.com", "", "93.184.216.34")
    apiserver = Pod("kubernetes", "default", "10.96.0.1", {"component": "apiserver"})
    for dst, port in ((internet, 443), (internet, 80), (apiserver, 443), (DNS["CoreDNS pod"], 9153)):
        assert not allowed(policies, rank0, dst, "TCP", port), (dst.name, port)
    assert not allowed(policies, rank0, internet, "UDP", 123)  # only DNS goes out over UDP


def test_network_policy_can_be_left_out():
    spec = JobSpec.from_yaml(EXAMPLE)
    spec.kubernetes.network_policy = False
    assert [d["kind"] for d in render_manifests(spec)] == ["ConfigMap", "Service", "Job"]
