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
"""

from __future__ import annotations

import posixpath
import re
from typing import Any

import yaml

from tprun.cluster.k8s_checks import validate_manifests
from tprun.cluster.k8s_lws import leader_worker_set, lws_pods
from tprun.cluster.k8s_network import JOB_NAME_LABEL, network_policy
from tprun.cluster.options import EPHEMERAL_PORTS, Volume
from tprun.config import JobSpec

CONTAINER = "tprun"
SPEC_DIR = "/etc/tprun"
SPEC_KEY = "job.yaml"
SHM_DIR = "/dev/shm"
TMP_DIR = "/tmp"
# Slurm writes memory as <n>K|M|G|T meaning KiB..TiB; Kubernetes spells those Ki..Ti ("G" is 10^9 there).
MEMORY = re.compile(r"^(\d+)(K|M|G|T|Ki|Mi|Gi|Ti)$")

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


def names(spec: JobSpec) -> dict[str, str]:
    return {"job": spec.name, "service": spec.name, "networkpolicy": spec.name, "configmap": f"{spec.name}-spec"}


def render_manifests(spec: JobSpec) -> list[dict[str, Any]]:
    """The ConfigMap, Service, NetworkPolicy (unless turned off) and Job for `spec`, in the order they are
    created; ValueError naming the field if it cannot run."""
    spec.check()
    _check_paths(spec)
    policy = [_network_policy(spec)] if spec.kubernetes.network_policy else []
    if spec.parallel.groups == "independent":  # LWS makes its own headless Service
        docs = [_configmap(spec), *policy, leader_worker_set(spec, _metadata(spec, spec.name), labels(spec), _pod(spec))]
    else:
        docs = [_configmap(spec), _service(spec), *policy, _job(spec)]
    validate_manifests(docs)
    return docs


LWS_HEADER = """\
# tprun on Kubernetes, independent groups: a ConfigMap with the job spec, a NetworkPolicy, a LeaderWorkerSet.
# Rendered by `tprun render k8s SPEC`; edit the spec and re-render rather than this file.
#   kubectl apply -f FILE; kubectl logs -f NAME-0 (group 0's leader); kubectl delete -f FILE once OUT/_SUCCESS exists
# Each group is one TP group, recreated alone when one of its pods restarts (RecreateGroupOnPodRestart);
# the groups share only the output directory (a ReadWriteMany volume), where they claim chunks by lease.
# Network: the set's pods accept TCP only from each other, on the master port and the ephemeral range
# (gloo/NCCL listeners); they may connect only to each other (same ports) and to DNS (port 53).
"""


def manifests_yaml(spec: JobSpec) -> str:
    header = LWS_HEADER if spec.parallel.groups == "independent" else HEADER
    return header + yaml.dump_all(render_manifests(spec), Dumper=_Dumper, sort_keys=False)


def spec_yaml(spec: JobSpec) -> str:
    """The spec as the pods read it: only what differs from the defaults, so it reads like the input."""
    return yaml.dump(spec.model_dump(mode="json", exclude_defaults=True), Dumper=_Dumper, sort_keys=False)


def labels(spec: JobSpec) -> dict[str, str]:
    return {"app.kubernetes.io/name": "tprun", "app.kubernetes.io/instance": spec.name}


def job_pods(spec: JobSpec) -> dict[str, str]:
    """Labels that only this job's pods carry: the template's, and the one the Job (or LWS) controller adds."""
    if spec.parallel.groups == "independent":
        return lws_pods(spec, labels(spec))
    return {**labels(spec), JOB_NAME_LABEL: names(spec)["job"]}


def _network_policy(spec: JobSpec) -> dict[str, Any]:
    return network_policy(_metadata(spec, names(spec)["networkpolicy"]), job_pods(spec), spec.kubernetes.master_port)


def _metadata(spec: JobSpec, name: str) -> dict[str, Any]:
    return {"name": name, "namespace": spec.kubernetes.namespace,
            "labels": {**labels(spec), "app.kubernetes.io/managed-by": "tprun"}}


def _configmap(spec: JobSpec) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _metadata(spec, names(spec)["configmap"]),
            "data": {SPEC_KEY: spec_yaml(spec)}}


def _service(spec: JobSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(spec, names(spec)["service"]),
        "spec": {
            "clusterIP": "None",
            # Pods have no readiness probe worth waiting for: rank 0 must be reachable as it starts.
            "publishNotReadyAddresses": True,
            "selector": labels(spec),
            "ports": [{"name": "rendezvous", "port": spec.kubernetes.master_port, "protocol": "TCP"}],
        },
    }


def _job(spec: JobSpec) -> dict[str, Any]:
    pods = spec.resources.nodes
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(spec, names(spec)["job"]),
        "spec": {
            "completionMode": "Indexed",
            "completions": pods,
            "parallelism": pods,
            "backoffLimit": 0,
            "podReplacementPolicy": "Failed",
            "podFailurePolicy": {"rules": [
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "NotIn",
                                                      "values": [0]}},
            ]},
            "template": {"metadata": {"labels": labels(spec)}, "spec": _pod(spec)},
        },
    }


def _pod(spec: JobSpec) -> dict[str, Any]:
    k8s, uid = spec.kubernetes, spec.kubernetes.run_as_user
    pod: dict[str, Any] = {
        "subdomain": names(spec)["service"],
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
    }
    if k8s.service_account:
        pod["serviceAccountName"] = k8s.service_account
    pod["securityContext"] = {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid, "fsGroup": uid,
                              "seccompProfile": {"type": "RuntimeDefault"},
                              # Where gloo's and NCCL's listeners land: the range the NetworkPolicy admits.
                              "sysctls": [{"name": "net.ipv4.ip_local_port_range",
                                           "value": f"{EPHEMERAL_PORTS[0]} {EPHEMERAL_PORTS[1]}"}]}
    if k8s.node_selector:
        pod["nodeSelector"] = dict(k8s.node_selector)
    if k8s.tolerations:
        pod["tolerations"] = [dict(t) for t in k8s.tolerations]
    pod["containers"] = [_container(spec)]
    pod["volumes"] = [
        {"name": "spec", "configMap": {"name": names(spec)["configmap"],
                                       "items": [{"key": SPEC_KEY, "path": SPEC_KEY}]}},
        # The root filesystem is read-only: /tmp is the one scratch place (HOME points there too).
        {"name": "tmp", "emptyDir": {}},
        # Docker's 64 MiB /dev/shm is too small for NCCL and for torch's CPU tensor sharing.
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        *(_volume(v) for v in k8s.volumes),
    ]
    return pod


def _container(spec: JobSpec) -> dict[str, Any]:
    k8s, res = spec.kubernetes, spec.resources
    procs = res.processes_per_node
    command = ["tprun", "run", f"{SPEC_DIR}/{SPEC_KEY}"]
    if procs > 1:
        command = ["python3", "-m", "tprun.launchers.fanout", "--nprocs", str(procs), "--", *command]
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": k8s.image,
        "imagePullPolicy": k8s.image_pull_policy,
        "command": command,
    }
    if k8s.working_dir:
        container["workingDir"] = k8s.working_dir
    container["env"] = _env(spec)
    container["ports"] = [{"name": "rendezvous", "containerPort": k8s.master_port, "protocol": "TCP"}]
    container["resources"] = _resources(spec)
    container["securityContext"] = {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                                    "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
    container["volumeMounts"] = [
        {"name": "spec", "mountPath": SPEC_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": TMP_DIR},
        {"name": "dshm", "mountPath": SHM_DIR},
        *({"name": v.name, "mountPath": v.mount_path, **({"readOnly": True} if v.read_only else {})}
          for v in k8s.volumes),
    ]
    return container


def _env(spec: JobSpec) -> list[dict[str, Any]]:
    """What the Kubernetes launcher reads (JOB_COMPLETION_INDEX comes from the Job controller)."""
    n = names(spec)

    def field(path: str) -> dict[str, Any]:
        return {"valueFrom": {"fieldRef": {"fieldPath": path}}}

    return [
        {"name": "TPRUN_JOB_NAME", "value": n["job"]},
        {"name": "TPRUN_SERVICE", "value": n["service"]},
        {"name": "TPRUN_NAMESPACE", **field("metadata.namespace")},
        {"name": "TPRUN_NUM_PODS", "value": str(spec.resources.nodes)},
        {"name": "TPRUN_PROCS_PER_POD", "value": str(spec.resources.processes_per_node)},
        {"name": "MASTER_PORT", "value": str(spec.kubernetes.master_port)},
        {"name": "TPRUN_DNS_TIMEOUT_S", "value": f"{spec.kubernetes.dns_timeout_s:g}"},
        {"name": "HOME", "value": TMP_DIR},
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]


def _resources(spec: JobSpec) -> dict[str, Any]:
    res, k8s = spec.resources, spec.kubernetes
    # No CPU limit: CFS throttling of one rank stalls every collective of its group.
    requests: dict[str, Any] = {"cpu": str(res.cpus_per_proc * res.processes_per_node)}
    limits: dict[str, Any] = {}
    if res.memory is not None:
        requests["memory"] = limits["memory"] = _memory(res.memory)
    if res.gpus_per_node:
        requests[k8s.gpu_resource] = limits[k8s.gpu_resource] = str(res.gpus_per_node)
    return {"requests": requests, **({"limits": limits} if limits else {})}


def _memory(text: str) -> str:
    m = MEMORY.match(text.strip())
    if not m:
        raise ValueError(
            f"resources.memory {text!r} is not understood; write a whole number with a unit: "
            "64G (Slurm style, GiB) or 64Gi (Kubernetes style), also K/M/T and Ki/Mi/Ti"
        )
    number, unit = m.groups()
    return f"{number}{unit if unit.endswith('i') else unit + 'i'}"


def _volume(v: Volume) -> dict[str, Any]:
    if v.pvc and v.host_path:
        raise ValueError(f"kubernetes.volumes[{v.name!r}]: give pvc or host_path, not both")
    if v.pvc:
        return {"name": v.name, "persistentVolumeClaim": {"claimName": v.pvc,
                                                          **({"readOnly": True} if v.read_only else {})}}
    if v.host_path:
        return {"name": v.name, "hostPath": {"path": v.host_path, "type": "Directory"}}
    raise ValueError(
        f"kubernetes.volumes[{v.name!r}]: give pvc (a PersistentVolumeClaim name) or host_path; "
        "a volume without a source would be empty"
    )


def _check_paths(spec: JobSpec) -> None:
    """The pods must see the model and input, and write the output somewhere that outlives them."""
    k8s = spec.kubernetes
    if k8s.working_dir is not None and not k8s.working_dir.startswith("/"):
        raise ValueError(f"kubernetes.working_dir {k8s.working_dir!r} must be an absolute path")
    for v in k8s.volumes:
        if not v.mount_path.startswith("/"):
            raise ValueError(f"kubernetes.volumes[{v.name!r}].mount_path {v.mount_path!r} must be absolute")
        if _under(v.mount_path, SPEC_DIR) or _under(v.mount_path, TMP_DIR) or _under(v.mount_path, SHM_DIR):
            raise ValueError(f"kubernetes.volumes[{v.name!r}].mount_path {v.mount_path!r} collides with "
                             f"{SPEC_DIR}, {TMP_DIR} or {SHM_DIR}, which tprun mounts itself")

    def in_pod(field: str) -> str:
        path = getattr(spec, field)
        if path.startswith("/"):
            return posixpath.normpath(path)
        if k8s.working_dir is None:
            raise ValueError(f"{field} {path!r} is relative: make it absolute, or set kubernetes.working_dir "
                             "(the container's working directory, usually a volume's mount path)")
        return posixpath.normpath(posixpath.join(k8s.working_dir, path))

    for field in ("model", "input"):
        in_pod(field)
    output = in_pod("output")
    writable = [v for v in k8s.volumes if not v.read_only and _under(output, v.mount_path)]
    if not writable:
        raise ValueError(
            f"output {spec.output!r} (in the pod: {output}) is on no writable volume, and the container's "
            "root filesystem is read-only: add a kubernetes.volumes entry (a PVC, ReadWriteMany when "
            "dp > 1) whose mount_path contains it"
        )


def _under(path: str, root: str) -> bool:
    root = root.rstrip("/") or "/"
    return path == root or path.startswith(root + "/")


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings, so the ConfigMap's spec reads as YAML, not one escaped line;
    never anchors and aliases (&id001 / *id001), which a reader of a manifest does not expect."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)
