"""Checks on Kubernetes manifests that schema validation (kubernetes-validate) does not make.

The OpenAPI schemas type a field but do not know its enum values, that a count is >= 0, what a
quantity looks like, or how objects refer to each other; the API server would reject those only at
`kubectl apply` time (or, for the tprun rules, accept a job that can never run). `check_manifests`
returns every problem found, each prefixed with the object and field; `validate_manifests` raises.

Here the metadata every object has and the Service; the Indexed Job in k8s_job_checks.py, the
LeaderWorkerSet in k8s_lws.py, the NetworkPolicy in k8s_network.py, and the pod spec the Job and the
LeaderWorkerSet both carry in k8s_pod_checks.py.
"""

from __future__ import annotations

from collections.abc import Iterator

from tprun.cluster.k8s_job_checks import check_job
from tprun.cluster.k8s_lws import check_lws
from tprun.cluster.k8s_network import check_network_policy
from tprun.cluster.k8s_pod_checks import check_enum, check_labels, check_port
from tprun.cluster.spec_rules import DNS1035_LABEL, DNS1123_LABEL, DNS1123_SUBDOMAIN


class ManifestError(ValueError):
    """The manifests would be rejected by the API server, or would start a job that cannot run."""


def validate_manifests(docs: list[dict]) -> None:
    problems = check_manifests(docs)
    if problems:
        raise ManifestError("invalid Kubernetes manifests:\n  " + "\n  ".join(problems))


def check_manifests(docs: list[dict]) -> list[str]:
    by_kind: dict[str, list[dict]] = {}
    for doc in docs:
        by_kind.setdefault(doc.get("kind", ""), []).append(doc)
    problems: list[str] = []
    for doc in docs:
        where = f"{doc.get('kind')} {doc.get('metadata', {}).get('name')!r}"
        problems += [f"{where}: {p}" for p in _check_doc(doc, by_kind)]
    return problems


def _check_doc(doc: dict, by_kind: dict[str, list[dict]]) -> Iterator[str]:
    meta = doc.get("metadata", {})
    name, kind = meta.get("name", ""), doc.get("kind")
    pattern, rule = (DNS1035_LABEL, "a DNS-1035 label: lower-case letter first") if kind == "Service" else (
        DNS1123_SUBDOMAIN, "a DNS-1123 subdomain")
    if not pattern.fullmatch(name) or len(name) > (63 if kind == "Service" else 253):
        yield f"metadata.name {name!r} must be {rule}, at most {63 if kind == 'Service' else 253} characters"
    if "namespace" in meta and not DNS1123_LABEL.fullmatch(meta["namespace"]):
        yield f"metadata.namespace {meta['namespace']!r} must be a DNS-1123 label"
    yield from check_labels("metadata.labels", meta.get("labels", {}))
    if kind == "Job":
        yield from check_job(doc, by_kind)
    elif kind == "Service":
        yield from _check_service(doc.get("spec", {}))
    elif kind == "NetworkPolicy":
        yield from check_network_policy(doc.get("spec", {}),
                                        by_kind.get("Job", []) + by_kind.get("LeaderWorkerSet", []))
    elif kind == "LeaderWorkerSet":
        yield from check_lws(doc)


def _check_service(spec: dict) -> Iterator[str]:
    yield from check_enum("spec.type", spec.get("type"), "serviceType")
    for i, port in enumerate(spec.get("ports", [])):
        yield from check_port(f"spec.ports[{i}]", port.get("port"), port.get("name"), port.get("protocol"))
        target = port.get("targetPort")
        if isinstance(target, int):
            yield from check_port(f"spec.ports[{i}].targetPort", target, None, None)
    yield from check_labels("spec.selector", spec.get("selector", {}))
