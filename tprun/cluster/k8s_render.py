"""A JobSpec as Kubernetes manifests: a ConfigMap with the spec, a headless Service, a NetworkPolicy and
an Indexed Job.

Pod i of Job J gets hostname J-i; `subdomain: J` plus the headless Service J (publishing pods before
they are Ready) makes J-0.J.<ns>.svc resolve to pod 0, where rank 0 listens. Each pod runs
`tprun run /etc/tprun/job.yaml`, reading the spec from the ConfigMap.

Failure model. A TP group is all-or-nothing: once the ranks have formed their process group, a rank
that dies cannot be replaced alone (the survivors' collectives fail), so retrying one pod, which is
what `backoffLimitPerIndex` and a plain `backoffLimit` do, only restarts a rank into a group that no
longer exists. So:
- any container exit other than 0 fails the whole Job at once (podFailurePolicy FailJob; the Job
  controller then stops the other pods); `backoffLimit: 0` makes every other counted failure do the
  same. Retrying is resubmitting the Job: the output directory lets a rerun resume (`tprun run` exits
  75 when stopped, 76 when a peer died: "rerun to resume"; 2 and 3 mean "fix the job first");
- a disruption (preemption, eviction, node drain: the DisruptionTarget condition) is not the job's
  fault: Ignore replaces that pod without counting. Before the group forms, the others are still
  waiting at the rendezvous and the replacement joins them; after, the survivors fail and FailJob
  ends the Job;
- `podReplacementPolicy: Failed` keeps a replacement from starting while the old pod with the same
  index (and hostname) is still terminating.

Network: a NetworkPolicy admits only the job's own pods to each other (k8s_network.py).
The pod itself (container, env, volumes, where paths may point) is k8s_pod.py; independent groups get a
LeaderWorkerSet instead of the Service and the Job (k8s_lws.py).
"""

from __future__ import annotations

from typing import Any

import yaml

from tprun.cluster import k8s_lws
from tprun.cluster.k8s_checks import validate_manifests
from tprun.cluster.k8s_network import JOB_NAME_LABEL, network_policy
from tprun.cluster.k8s_pod import CONTAINER, SPEC_KEY, check_paths, names, pod_spec
from tprun.config import JobSpec

HEADER = """\
# tprun on Kubernetes: a ConfigMap with the job spec, a headless Service, a NetworkPolicy, an Indexed Job.
# Rendered by `tprun render k8s SPEC`; edit the spec and re-render rather than this file.
#   kubectl apply -f FILE; kubectl logs -f job/NAME; kubectl delete -f FILE
# Failure model (see tprun/cluster/k8s_render.py): a TP group is all-or-nothing, so any failed
# container fails the whole Job (podFailurePolicy FailJob, backoffLimit 0) and retrying means
# resubmitting; a disrupted (preempted, evicted) pod is replaced without counting (Ignore).
# Network: the job's pods accept TCP only from each other, on the master port and the ephemeral range
# (gloo/NCCL listeners); they may connect only to each other (same ports) and to DNS (port 53).
"""


def render_manifests(spec: JobSpec) -> list[dict[str, Any]]:
    """The ConfigMap, Service, NetworkPolicy (unless turned off) and Job for `spec`, in the order they are
    created; ValueError naming the field if it cannot run."""
    spec.check()
    check_paths(spec)
    policy = [_network_policy(spec)] if spec.kubernetes.network_policy else []
    if spec.parallel.groups == "independent":  # LWS makes its own headless Service
        lws = k8s_lws.leader_worker_set(spec, _metadata(spec, spec.name), labels(spec), pod_spec(spec))
        docs = [_configmap(spec), *policy, lws]
    else:
        docs = [_configmap(spec), _service(spec), *policy, _job(spec)]
    validate_manifests(docs)
    return docs


def manifests_yaml(spec: JobSpec) -> str:
    header = k8s_lws.HEADER if spec.parallel.groups == "independent" else HEADER
    return header + yaml.dump_all(render_manifests(spec), Dumper=_Dumper, sort_keys=False)


def spec_yaml(spec: JobSpec) -> str:
    """The spec as the pods read it: only what differs from the defaults, so it reads like the input."""
    return yaml.dump(spec.model_dump(mode="json", exclude_defaults=True), Dumper=_Dumper, sort_keys=False)


def labels(spec: JobSpec) -> dict[str, str]:
    return {"app.kubernetes.io/name": "tprun", "app.kubernetes.io/instance": spec.name}


def job_pods(spec: JobSpec) -> dict[str, str]:
    """Labels that only this job's pods carry: the template's, and the one the Job (or LWS) controller adds."""
    if spec.parallel.groups == "independent":
        return k8s_lws.lws_pods(spec, labels(spec))
    return {**labels(spec), JOB_NAME_LABEL: names(spec)["job"]}


def _network_policy(spec: JobSpec) -> dict[str, Any]:
    return network_policy(_metadata(spec, names(spec)["networkpolicy"]), job_pods(spec), spec.kubernetes.master_port)


def _metadata(spec: JobSpec, name: str) -> dict[str, Any]:
    return {"name": name, "namespace": spec.kubernetes.namespace,
            "labels": {**labels(spec), "app.kubernetes.io/managed-by": "tprun"}}


def _object(spec: JobSpec, api_version: str, kind: str, name: str, /, **body: Any) -> dict[str, Any]:
    """The head every object starts with, then `body` (data or spec) in order, as kubectl shows it.
    Positional-only, since `spec` is both the JobSpec and a body field of the Service and the Job."""
    return {"apiVersion": api_version, "kind": kind, "metadata": _metadata(spec, name), **body}


def _configmap(spec: JobSpec) -> dict[str, Any]:
    return _object(spec, "v1", "ConfigMap", names(spec)["configmap"], data={SPEC_KEY: spec_yaml(spec)})


def _service(spec: JobSpec) -> dict[str, Any]:
    return _object(spec, "v1", "Service", names(spec)["service"], spec={
        "clusterIP": "None",
        # Pods have no readiness probe worth waiting for: rank 0 must be reachable as it starts.
        "publishNotReadyAddresses": True,
        "selector": labels(spec),
        "ports": [{"name": "rendezvous", "port": spec.kubernetes.master_port, "protocol": "TCP"}],
    })


def _job(spec: JobSpec) -> dict[str, Any]:
    pods = spec.resources.nodes
    return _object(spec, "batch/v1", "Job", names(spec)["job"], spec={
        "completionMode": "Indexed",
        "completions": pods,
        "parallelism": pods,
        "backoffLimit": 0,
        "podReplacementPolicy": "Failed",
        "podFailurePolicy": {"rules": [
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "NotIn", "values": [0]}},
        ]},
        "template": {"metadata": {"labels": labels(spec)}, "spec": pod_spec(spec)},
    })


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings, so the ConfigMap's spec reads as YAML, not one escaped line;
    never anchors and aliases (&id001 / *id001), which a reader of a manifest does not expect."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)
