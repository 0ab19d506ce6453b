"""A small evaluator of Kubernetes NetworkPolicy semantics, for tests: no CNI runs in CI.

Written from the API reference (networking.k8s.io/v1), independent of tprun's render and checks: a pod is
isolated for a direction when a policy of its namespace selects it with that policy type; a connection
needs the source's egress and the destination's ingress; policies add up; a peer with only a
podSelector means pods of the policy's namespace; an absent `from`/`to`/`ports` admits all; a port
without a number admits every port of its protocol; `endPort` makes a range.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    ip: str
    labels: dict[str, str] = field(default_factory=dict, hash=False)


def _matches(selector: dict, labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def _peer_matches(peer: dict, policy_ns: str, pod: Pod) -> bool:
    if "ipBlock" in peer:
        ip = ipaddress.ip_address(pod.ip)
        return ip in ipaddress.ip_network(peer["ipBlock"]["cidr"]) and not any(
            ip in ipaddress.ip_network(e) for e in peer["ipBlock"].get("except", []))
    ns_labels = {"kubernetes.io/metadata.name": pod.namespace}
    in_ns = _matches(peer["namespaceSelector"], ns_labels) if "namespaceSelector" in peer else pod.namespace == policy_ns
    return in_ns and _matches(peer.get("podSelector", {}), pod.labels)


def _port_matches(rule_ports: list[dict] | None, protocol: str, port: int) -> bool:
    if not rule_ports:
        return True
    for p in rule_ports:
        if p.get("protocol", "TCP") != protocol:
            continue
        if "port" not in p or p["port"] <= port <= p.get("endPort", p["port"]):
            return True
    return False


def _direction_allows(policies: list[dict], pod: Pod, peer: Pod, protocol: str, port: int, kind: str) -> bool:
    key, peers_key = ("ingress", "from") if kind == "Ingress" else ("egress", "to")
    selecting = []
    for pol in policies:
        spec, ns = pol["spec"], pol["metadata"].get("namespace", "default")
        types = spec.get("policyTypes") or (["Ingress"] + (["Egress"] if "egress" in spec else []))
        if ns == pod.namespace and kind in types and _matches(spec["podSelector"], pod.labels):
            selecting.append((ns, spec.get(key, [])))
    if not selecting:
        return True  # not isolated in this direction
    return any((peers_key not in rule or any(_peer_matches(p, ns, peer) for p in rule[peers_key]))
               and _port_matches(rule.get("ports"), protocol, port)
               for ns, rules in selecting for rule in rules)


def allowed(policies: list[dict], src: Pod, dst: Pod, protocol: str, port: int) -> bool:
    """May `src` open a connection to `dst` on protocol/port (egress at src and ingress at dst)?"""
    return (_direction_allows(policies, src, dst, protocol, port, "Egress")
            and _direction_allows(policies, dst, src, protocol, port, "Ingress"))


def job_pods(docs: list[dict], ips: list[str] | None = None) -> list[Pod]:
    """The Indexed Job's pods, labelled as the Job controller labels them (or the LeaderWorkerSet's, as
    its controller labels them: pod i is worker i % size of group i // size)."""
    lws = next((d for d in docs if d["kind"] == "LeaderWorkerSet"), None)
    if lws is not None:
        from tests.k8s_pods import lws_hostname

        name, ns = lws["metadata"]["name"], lws["metadata"]["namespace"]
        size, n = lws["spec"]["leaderWorkerTemplate"]["size"], lws["spec"]["replicas"] * lws["spec"]["leaderWorkerTemplate"]["size"]
        template = lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["metadata"]["labels"]
        ips = ips or [f"10.0.0.{10 + i}" for i in range(n)]
        return [Pod(lws_hostname(lws, i), ns, ips[i], {
            **template, "leaderworkerset.sigs.k8s.io/name": name, "leaderworkerset.sigs.k8s.io/group-index":
            str(i // size), "leaderworkerset.sigs.k8s.io/worker-index": str(i % size)}) for i in range(n)]
    job = next(d for d in docs if d["kind"] == "Job")
    name, ns = job["metadata"]["name"], job["metadata"]["namespace"]
    template = job["spec"]["template"]["metadata"]["labels"]
    n = job["spec"]["completions"]
    ips = ips or [f"10.0.0.{10 + i}" for i in range(n)]
    return [Pod(f"{name}-{i}", ns, ips[i], {
        **template, "batch.kubernetes.io/job-name": name, "job-name": name, "batch.kubernetes.io/controller-uid":
        "3c5d", "controller-uid": "3c5d", "batch.kubernetes.io/job-completion-index": str(i)}) for i in range(n)]
