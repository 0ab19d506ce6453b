"""The NetworkPolicy of a tprun job on Kubernetes: rendered (for k8s_render) and checked (for k8s_checks).

Rank 0's rendezvous store (TCPStore on the master port) hands out work and trusts what it is
told, so only the job's own pods may reach it. The NetworkPolicy selects the job's pods (the pod
template's labels plus `batch.kubernetes.io/job-name`, which the Job controller sets) and admits
ingress only from those pods, only over TCP, and only on the ports tprun uses: the master port, and
the ephemeral range, because gloo (and NCCL over sockets) listen on ports the kernel picks from
`net.ipv4.ip_local_port_range`. The pods pin that range with a (namespaced, "safe") sysctl, so a node's
own setting cannot move the listeners outside the policy. Egress is limited the same way, plus DNS
(port 53, UDP and TCP, to any address: cluster DNS may be CoreDNS pods or a node-local cache). Policies
need a CNI that enforces them (Calico, Cilium, ...); elsewhere the object is accepted and has no effect.
`kubernetes.network_policy: false` leaves it out.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from tprun.cluster.options import EPHEMERAL_PORTS
from tprun.cluster.spec_rules import LABEL_VALUE

# Set by the Job controller on the pods it creates (Kubernetes 1.27+).
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
# Set by the LeaderWorkerSet controller on every pod of the set (independent groups, k8s_lws.py).
LWS_NAME_LABEL = "leaderworkerset.sigs.k8s.io/name"
DNS_PORT = 53
POLICY_TYPES = {"Ingress", "Egress"}
PROTOCOLS = {"TCP", "UDP", "SCTP"}


def policy_ports(master_port: int) -> list[dict[str, Any]]:
    """The TCP ports a rank listens on: the rendezvous store, and what gloo/NCCL bind (port 0)."""
    low, high = EPHEMERAL_PORTS
    return [{"protocol": "TCP", "port": master_port}, {"protocol": "TCP", "port": low, "endPort": high}]


def network_policy(metadata: dict[str, Any], pods: dict[str, str], master_port: int) -> dict[str, Any]:
    """The policy over the pods labelled `pods`: in from and out to each other on the ranks' ports, out to DNS."""
    def same_job() -> list[dict[str, Any]]:  # a fresh object each time: no YAML aliases, no shared edits
        return [{"podSelector": {"matchLabels": dict(pods)}}]

    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata,
        "spec": {
            "podSelector": {"matchLabels": dict(pods)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": same_job(), "ports": policy_ports(master_port)}],
            "egress": [
                {"to": same_job(), "ports": policy_ports(master_port)},
                {"ports": [{"protocol": "UDP", "port": DNS_PORT}, {"protocol": "TCP", "port": DNS_PORT}]},
            ],
        },
    }


def check_network_policy(spec: dict, jobs: list[dict]) -> Iterator[str]:
    """What the API server would refuse in a NetworkPolicy's spec, and whether it lets `jobs` run."""
    for i, kind in enumerate(spec.get("policyTypes", [])):
        if kind not in POLICY_TYPES:
            yield f"spec.policyTypes[{i}]: {kind!r} is not one of {sorted(POLICY_TYPES)}"
    for key, value in spec.get("podSelector", {}).get("matchLabels", {}).items():
        if not isinstance(value, str) or len(value) > 63 or not LABEL_VALUE.fullmatch(value):
            yield f"spec.podSelector.matchLabels[{key!r}]: {value!r} is not a label value"
    for direction in ("ingress", "egress"):
        for i, rule in enumerate(spec.get(direction, [])):
            for j, port in enumerate(rule.get("ports", [])):
                path = f"spec.{direction}[{i}].ports[{j}]"
                if port.get("protocol", "TCP") not in PROTOCOLS:
                    yield f"{path}.protocol: {port.get('protocol')!r} is not one of {sorted(PROTOCOLS)}"
                number, end = port.get("port"), port.get("endPort")
                if isinstance(number, int) and not 0 < number < 65536:
                    yield f"{path}.port: {number} must be in 1..65535"
                if end is not None and (not isinstance(number, int) or not number <= end < 65536):
                    yield f"{path}.endPort: {end!r} needs a numeric port <= endPort <= 65535"
    # tprun's rule: a policy over the job's pods must let the ranks reach rank 0's store, or they hang.
    for job in jobs:
        name, kind = job.get("metadata", {}).get("name"), job.get("kind", "Job")
        if kind == "LeaderWorkerSet":  # its pods carry the set's name label (LWS controller)
            template = job.get("spec", {}).get("leaderWorkerTemplate", {}).get("workerTemplate", {})
            pods = {**template.get("metadata", {}).get("labels", {}), LWS_NAME_LABEL: name}
        else:
            template = job.get("spec", {}).get("template", {})
            pods = {**template.get("metadata", {}).get("labels", {}), JOB_NAME_LABEL: name}
        if not _selects(spec.get("podSelector", {}), pods):
            yield f"spec.podSelector selects none of {kind} {name!r}'s pods: they would run unguarded"
            continue
        env = {e.get("name"): e.get("value") for c in template.get("spec", {}).get("containers", [])
               for e in c.get("env", [])}
        port = int(env["MASTER_PORT"]) if str(env.get("MASTER_PORT", "")).isdigit() else 29500
        types = spec.get("policyTypes", ["Ingress"])
        for direction, peers in (("ingress", "from"), ("egress", "to")):
            if direction.capitalize() in types and not any(
                    _rule_admits(rule, peers, pods, port) for rule in spec.get(direction, [])):
                yield (f"spec.{direction}: admits no TCP to port {port} (MASTER_PORT) between the job's own pods; "
                       "the ranks could not reach rank 0's rendezvous store")


def _selects(selector: dict, labels: dict) -> bool:
    """matchLabels only (what tprun renders); a selector with matchExpressions is not judged here."""
    if selector.get("matchExpressions"):
        return True
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _rule_admits(rule: dict, peers: str, pods: dict, port: int) -> bool:
    if peers in rule and not any("podSelector" in p and "namespaceSelector" not in p
                                 and _selects(p["podSelector"], pods) for p in rule[peers]):
        return False
    ports = rule.get("ports")
    return not ports or any(p.get("protocol", "TCP") == "TCP" and (
        p.get("port") is None or (isinstance(p["port"], int) and p["port"] <= port <= p.get("endPort", p["port"])))
        for p in ports)
