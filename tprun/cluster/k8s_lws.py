"""Independent groups on Kubernetes: a LeaderWorkerSet of dp groups, each one TP group's pods.

`parallel.groups: independent` renders a LeaderWorkerSet (leaderworkerset.x-k8s.io/v1) instead of the
Indexed Job: `replicas` = dp groups of `size` = nodes/dp pods. Each group is a world of its own; the
leader (worker index 0) hosts its rank 0, found through LWS_LEADER_ADDRESS (launchers/lws.py), and the
groups share only the output directory, where they claim chunks by lease (runner/leases.py). The output
must therefore be on a ReadWriteMany volume that every group mounts.

Failure model: `RecreateGroupOnPodRestart` recreates a whole group when any of its pods or containers
restarts, since a TP group is all-or-nothing; the other groups go on, and the lost group's chunks are
redone (by it, once recreated, or by another group) after their leases expire. LWS pods are StatefulSet
pods (restartPolicy Always): LWS has no notion of completion, so once OUT/_SUCCESS exists every group
exits 0 and, restarted, exits 0 again at once ("nothing to do"); delete the LeaderWorkerSet then.
LWS creates the headless Service (named after the LWS) that gives pods their DNS names itself.

Here the LeaderWorkerSet is rendered (for k8s_render) and checked (for k8s_checks), as k8s_network.py
does for the NetworkPolicy.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from tprun.cluster.k8s_network import LWS_NAME_LABEL
from tprun.cluster.k8s_pod import TMP_DIR
from tprun.cluster.k8s_pod_checks import check_at_least, check_labels, check_pod
from tprun.config import JobSpec

API_VERSION = "leaderworkerset.x-k8s.io/v1"
KIND = "LeaderWorkerSet"
# Set by the LWS controller on every pod of the set and of one group.
GROUP_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/group-index"
# Env the LWS controller injects itself (from LWS 0.6); the rest the pod template carries.
LWS_ENV = ("LWS_LEADER_ADDRESS", "LWS_GROUP_SIZE", "LWS_WORKER_INDEX")

HEADER = """\
# tprun on Kubernetes, independent groups: a ConfigMap with the job spec, a NetworkPolicy, a LeaderWorkerSet.
# Rendered by `tprun render k8s SPEC`; edit the spec and re-render rather than this file.
#   kubectl apply -f FILE; kubectl logs -f NAME-0 (group 0's leader); kubectl delete -f FILE once OUT/_SUCCESS exists
# Each group is one TP group, recreated alone when one of its pods restarts (RecreateGroupOnPodRestart);
# the groups share only the output directory (a ReadWriteMany volume), where they claim chunks by lease.
# Network: the set's pods accept TCP only from each other, on the master port and the ephemeral range
# (gloo/NCCL listeners); they may connect only to each other (same ports) and to DNS (port 53).
"""


def pods_per_group(spec: JobSpec) -> int:
    nodes, dp = spec.resources.nodes, spec.parallel.data_parallel_size
    if nodes % dp:
        raise ValueError(f"independent groups run dp({dp}) LeaderWorkerSet groups of resources.nodes / dp pods, "
                         f"but nodes({nodes}) is not a multiple of dp; set resources.nodes to a multiple of dp")
    return nodes // dp


def lws_pods(spec: JobSpec, labels: dict[str, str]) -> dict[str, str]:
    """Labels only this set's pods carry: the template's, and the one the LWS controller adds."""
    return {**labels, LWS_NAME_LABEL: spec.name}


def leader_worker_set(spec: JobSpec, metadata: dict[str, Any], labels: dict[str, str],
                      pod: dict[str, Any]) -> dict[str, Any]:
    """The LeaderWorkerSet around `pod`, the Indexed Job's pod spec (k8s_pod.pod_spec), adapted."""
    pod = {k: v for k, v in pod.items() if k != "subdomain"}  # LWS sets subdomain to its own Service
    pod["restartPolicy"] = "Always"  # the only policy a StatefulSet's pods may have
    container = pod["containers"][0]
    container["command"] = [*container["command"], "--groups", "independent"]
    container["env"] = group_env(spec)
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": metadata,
        "spec": {
            "replicas": spec.parallel.data_parallel_size,
            "startupPolicy": "LeaderCreated",
            "leaderWorkerTemplate": {
                "size": pods_per_group(spec),
                "restartPolicy": "RecreateGroupOnPodRestart",
                "workerTemplate": {"metadata": {"labels": dict(labels)}, "spec": pod},
            },
            "networkConfig": {"subdomainPolicy": "Shared"},
        },
    }


def group_env(spec: JobSpec) -> list[dict[str, Any]]:
    """What the LWS launcher reads besides LWS_*; the group index from the pod's own label."""
    return [
        {"name": "TPRUN_PROCS_PER_POD", "value": str(spec.resources.processes_per_node)},
        {"name": "TPRUN_GROUP_INDEX",
         "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{GROUP_INDEX_LABEL}']"}}},
        {"name": "MASTER_PORT", "value": str(spec.kubernetes.master_port)},
        {"name": "TPRUN_DNS_TIMEOUT_S", "value": f"{spec.kubernetes.dns_timeout_s:g}"},
        {"name": "HOME", "value": TMP_DIR},
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]


def check_lws(lws: dict) -> Iterator[str]:
    """The LWS schema itself is pinned in tests (tests/schemas); here the pods and tprun's rules."""
    spec = lws.get("spec", {})
    yield from check_at_least("spec.replicas", spec.get("replicas"), 1)
    template = spec.get("leaderWorkerTemplate", {})
    yield from check_at_least("spec.leaderWorkerTemplate.size", template.get("size"), 1)
    if template.get("restartPolicy") != "RecreateGroupOnPodRestart":
        yield ("spec.leaderWorkerTemplate.restartPolicy must be RecreateGroupOnPodRestart: a TP group whose "
               "pod restarted alone could never form again")
    worker = template.get("workerTemplate", {})
    yield from check_labels("spec.leaderWorkerTemplate.workerTemplate.metadata.labels",
                            worker.get("metadata", {}).get("labels", {}))
    pod = worker.get("spec", {})
    if pod.get("restartPolicy", "Always") != "Always":
        yield "spec.leaderWorkerTemplate.workerTemplate.spec.restartPolicy: StatefulSet pods need Always"
    yield from (f"spec.leaderWorkerTemplate.workerTemplate.spec.{p}" for p in check_pod(pod))
