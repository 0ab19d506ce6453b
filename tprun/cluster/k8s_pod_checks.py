"""Checks on a pod spec (the Indexed Job's template, the LeaderWorkerSet's worker template), and the field
rules every object's checks share: enum values, counts, label values, ports and quantities.

Each check yields problems with the field's path relative to what it was given; the caller prefixes its own
path (k8s_checks.py, k8s_job_checks.py, k8s_lws.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from decimal import Decimal, InvalidOperation
from typing import Any

from tprun.cluster.spec_rules import DNS1123_LABEL, DNS1123_SUBDOMAIN, LABEL_VALUE

ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
PORT_NAME = re.compile(r"^(?=.*[a-z])(?!.*--)[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# k8s.io/apimachinery resource.Quantity: signed decimal, then a binary SI, decimal SI or exponent suffix.
QUANTITY = re.compile(r"^([+-]?)(\d+\.?\d*|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|[mkMGTPE]|[eE][+-]?\d+)?$")
_SUFFIX = {
    "": 1, "m": Decimal("0.001"), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
    "E": 10**18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}

ENUMS: dict[str, set[str]] = {
    "completionMode": {"NonIndexed", "Indexed"},
    "podReplacementPolicy": {"TerminatingOrFailed", "Failed"},
    "jobRestartPolicy": {"Never", "OnFailure"},
    "action": {"FailJob", "FailIndex", "Ignore", "Count"},
    "operator": {"In", "NotIn"},
    "podConditionStatus": {"True", "False", "Unknown"},
    "imagePullPolicy": {"Always", "IfNotPresent", "Never"},
    "protocol": {"TCP", "UDP", "SCTP"},
    "serviceType": {"ClusterIP", "NodePort", "LoadBalancer", "ExternalName"},
    "seccompType": {"RuntimeDefault", "Localhost", "Unconfined"},
    "tolerationOperator": {"Exists", "Equal"},
    "tolerationEffect": {"", "NoSchedule", "PreferNoSchedule", "NoExecute"},
    "emptyDirMedium": {"", "Memory"},
    "hostPathType": {"", "DirectoryOrCreate", "Directory", "FileOrCreate", "File", "Socket",
                     "CharDevice", "BlockDevice"},
    "dnsPolicy": {"ClusterFirst", "ClusterFirstWithHostNet", "Default", "None"},
    "fieldPath": {"metadata.name", "metadata.namespace", "metadata.uid", "metadata.labels",
                  "metadata.annotations", "spec.nodeName", "spec.serviceAccountName", "status.hostIP",
                  "status.hostIPs", "status.podIP", "status.podIPs"},
}
VOLUME_SOURCES = ("configMap", "secret", "emptyDir", "hostPath", "persistentVolumeClaim", "nfs", "csi",
                  "projected", "downwardAPI", "ephemeral", "image")


def parse_quantity(text: Any) -> Decimal:
    """A Kubernetes quantity ('500m', '64Gi', '1e3', 2) as a number; ValueError if malformed."""
    m = QUANTITY.fullmatch(str(text))
    if isinstance(text, bool) or not m:
        raise ValueError(f"{text!r} is not a Kubernetes quantity (e.g. 500m, 2, 64Gi, 1G)")
    sign, number, suffix = m.group(1), m.group(2), m.group(3) or ""
    try:
        value = Decimal(number)
    except InvalidOperation:
        raise ValueError(f"{text!r} is not a Kubernetes quantity") from None
    scale = Decimal(10) ** int(suffix[1:]) if suffix[:1] in ("e", "E") else Decimal(_SUFFIX[suffix])
    return (-1 if sign == "-" else 1) * value * scale


def check_labels(path: str, labels: dict) -> Iterator[str]:
    for key, value in labels.items():
        if not isinstance(value, str) or not LABEL_VALUE.fullmatch(value) or len(value) > 63:
            yield f"{path}[{key!r}]: {value!r} is not a label value (<= 63 alphanumerics, '-', '_', '.')"


def check_enum(path: str, value: Any, enum: str) -> Iterator[str]:
    if value is not None and value not in ENUMS[enum]:
        yield f"{path}: {value!r} is not one of {sorted(ENUMS[enum])}"


def check_at_least(path: str, value: Any, low: int) -> Iterator[str]:
    if value is not None and (not isinstance(value, int) or value < low):
        yield f"{path}: {value!r} must be an integer >= {low}"


def check_port(path: str, number: Any, name: Any, protocol: Any) -> Iterator[str]:
    if not isinstance(number, int) or not 0 < number < 65536:
        yield f"{path}: port {number!r} must be in 1..65535"
    if name is not None and (not PORT_NAME.fullmatch(name) or len(name) > 15):
        yield f"{path}.name: {name!r} must be an IANA service name (<= 15 lower-case alphanumerics and '-')"
    yield from check_enum(f"{path}.protocol", protocol, "protocol")


def check_pod(pod: dict) -> Iterator[str]:
    yield from check_enum("dnsPolicy", pod.get("dnsPolicy"), "dnsPolicy")
    yield from check_at_least("terminationGracePeriodSeconds", pod.get("terminationGracePeriodSeconds"), 0)
    if "subdomain" in pod and not DNS1123_LABEL.fullmatch(pod["subdomain"]):
        yield f"subdomain: {pod['subdomain']!r} must be a DNS-1123 label"
    yield from check_labels("nodeSelector", pod.get("nodeSelector", {}))
    yield from _security_context("securityContext", pod.get("securityContext", {}))
    for i, tol in enumerate(pod.get("tolerations", [])):
        yield from check_enum(f"tolerations[{i}].operator", tol.get("operator"), "tolerationOperator")
        yield from check_enum(f"tolerations[{i}].effect", tol.get("effect"), "tolerationEffect")
        if tol.get("operator") == "Exists" and tol.get("value"):
            yield f"tolerations[{i}].value must be empty when operator is Exists"
        if "tolerationSeconds" in tol and tol.get("effect") != "NoExecute":
            yield f"tolerations[{i}].tolerationSeconds needs effect NoExecute"
    volumes = pod.get("volumes", [])
    names = [v.get("name") for v in volumes]
    for i, vol in enumerate(volumes):
        yield from _check_volume(f"volumes[{i}]", vol, names)
    containers = pod.get("containers", [])
    if len({c.get("name") for c in containers}) != len(containers):
        yield "containers: container names must be unique"
    for i, c in enumerate(containers):
        yield from _check_container(f"containers[{i}]", c, set(names))


def _check_volume(path: str, vol: dict, names: list) -> Iterator[str]:
    name = vol.get("name", "")
    if not DNS1123_LABEL.fullmatch(name) or len(name) > 63:
        yield f"{path}.name: {name!r} must be a DNS-1123 label"
    if names.count(name) > 1:
        yield f"{path}.name: {name!r} is used by more than one volume"
    sources = [s for s in VOLUME_SOURCES if s in vol]
    if len(sources) > 1:
        yield f"{path}: give one volume source, got {sources}"
    if "emptyDir" in vol:
        yield from check_enum(f"{path}.emptyDir.medium", vol["emptyDir"].get("medium"), "emptyDirMedium")
        if "sizeLimit" in vol["emptyDir"]:
            yield from _resources(f"{path}.emptyDir", {"limits": {"sizeLimit": vol["emptyDir"]["sizeLimit"]}})
    if "hostPath" in vol:
        yield from check_enum(f"{path}.hostPath.type", vol["hostPath"].get("type"), "hostPathType")
        if not str(vol["hostPath"].get("path", "")).startswith("/"):
            yield f"{path}.hostPath.path must be absolute"
    claim = vol.get("persistentVolumeClaim", {}).get("claimName")
    if claim is not None and not DNS1123_SUBDOMAIN.fullmatch(claim):
        yield f"{path}.persistentVolumeClaim.claimName: {claim!r} must be a DNS-1123 subdomain"


def _check_container(path: str, c: dict, volumes: set) -> Iterator[str]:
    if not DNS1123_LABEL.fullmatch(c.get("name", "")):
        yield f"{path}.name: {c.get('name')!r} must be a DNS-1123 label"
    yield from check_enum(f"{path}.imagePullPolicy", c.get("imagePullPolicy"), "imagePullPolicy")
    env_names = [e.get("name", "") for e in c.get("env", [])]
    for i, e in enumerate(c.get("env", [])):
        if not ENV_NAME.fullmatch(e.get("name", "")):
            yield f"{path}.env[{i}].name: {e.get('name')!r} is not a valid variable name"
        if env_names.count(e.get("name")) > 1:
            yield f"{path}.env[{i}].name: {e.get('name')!r} is set more than once"
        field_path = e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        if field_path is not None and field_path.split("[")[0] not in ENUMS["fieldPath"]:
            yield f"{path}.env[{i}].valueFrom.fieldRef.fieldPath: {field_path!r} is not supported"
    for i, port in enumerate(c.get("ports", [])):
        yield from check_port(f"{path}.ports[{i}]", port.get("containerPort"), port.get("name"), port.get("protocol"))
    yield from _resources(f"{path}.resources", c.get("resources", {}))
    yield from _security_context(f"{path}.securityContext", c.get("securityContext", {}))
    mounts = [m.get("mountPath", "") for m in c.get("volumeMounts", [])]
    for i, m in enumerate(c.get("volumeMounts", [])):
        if m.get("name") not in volumes:
            yield f"{path}.volumeMounts[{i}].name: no volume named {m.get('name')!r}"
        if not m.get("mountPath", "").startswith("/"):
            yield f"{path}.volumeMounts[{i}].mountPath: {m.get('mountPath')!r} must be absolute"
        if mounts.count(m.get("mountPath")) > 1:
            yield f"{path}.volumeMounts[{i}].mountPath: {m.get('mountPath')!r} is mounted more than once"


def _resources(path: str, res: dict) -> Iterator[str]:
    parsed: dict[str, dict[str, Decimal]] = {}
    for kind in ("requests", "limits"):
        for name, value in (res.get(kind) or {}).items():
            try:
                q = parse_quantity(value)
            except ValueError as e:
                yield f"{path}.{kind}[{name!r}]: {e}"
                continue
            if q < 0:
                yield f"{path}.{kind}[{name!r}]: {value!r} must not be negative"
            extended = "/" in name and not name.startswith("kubernetes.io/")
            if extended and q != q.to_integral_value():
                yield f"{path}.{kind}[{name!r}]: {value!r} must be a whole number (extended resource)"
            parsed.setdefault(kind, {})[name] = q
    requests, limits = parsed.get("requests", {}), parsed.get("limits", {})
    for name, req in requests.items():
        if name in limits and req > limits[name]:
            yield f"{path}.requests[{name!r}] must not exceed limits[{name!r}]"
        if "/" in name and not name.startswith("kubernetes.io/") and limits.get(name, req) != req:
            yield f"{path}.requests[{name!r}] must equal limits (extended resources cannot be overcommitted)"


def _security_context(path: str, sc: dict) -> Iterator[str]:
    yield from check_enum(f"{path}.seccompProfile.type", sc.get("seccompProfile", {}).get("type"), "seccompType")
    for field in ("runAsUser", "runAsGroup", "fsGroup"):
        yield from check_at_least(f"{path}.{field}", sc.get(field), 0)
    if sc.get("runAsNonRoot") and sc.get("runAsUser") == 0:
        yield f"{path}: runAsNonRoot is true but runAsUser is 0 (root); the pod would never start"


def restricted_violations(pod: dict) -> list[str]:
    """Where a pod spec falls short of the Pod Security Standard 'restricted' profile."""
    problems = []
    pod_sc = pod.get("securityContext", {})
    for i, vol in enumerate(pod.get("volumes", [])):
        if "hostPath" in vol:
            problems.append(f"volumes[{i}] ({vol.get('name')}): hostPath volumes are not allowed")
    for c in pod.get("containers", []):
        sc, name = c.get("securityContext", {}), c.get("name")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"container {name}: allowPrivilegeEscalation must be false")
        if sc.get("privileged"):
            problems.append(f"container {name}: privileged is not allowed")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            problems.append(f"container {name}: capabilities.drop must include ALL")
        if set(sc.get("capabilities", {}).get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"container {name}: only NET_BIND_SERVICE may be added")
        if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
            problems.append(f"container {name}: runAsNonRoot must be true")
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"container {name}: seccompProfile.type must be RuntimeDefault or Localhost")
    return problems
