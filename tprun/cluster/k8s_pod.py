"""The pod every tprun job on Kubernetes runs: the Indexed Job's pod template (k8s_render.py), which the
LeaderWorkerSet adapts (k8s_lws.py), and the checks that its paths can work inside the container.

Each pod runs `tprun run /etc/tprun/job.yaml`, reading the spec from the ConfigMap, with a read-only root
filesystem: /tmp and /dev/shm are its scratch, and the output must be on a writable volume.
"""

from __future__ import annotations

import posixpath
import re
from typing import Any

from tprun.cluster.options import EPHEMERAL_PORTS, Volume
from tprun.config import JobSpec

CONTAINER = "tprun"
SPEC_DIR = "/etc/tprun"
SPEC_KEY = "job.yaml"
SHM_DIR = "/dev/shm"
TMP_DIR = "/tmp"
# Slurm writes memory as <n>K|M|G|T meaning KiB..TiB; Kubernetes spells those Ki..Ti ("G" is 10^9 there).
MEMORY = re.compile(r"^(\d+)(K|M|G|T|Ki|Mi|Gi|Ti)$")


def names(spec: JobSpec) -> dict[str, str]:
    """The job's objects' names; here, below k8s_render, since the pod refers to its Service and ConfigMap."""
    return {"job": spec.name, "service": spec.name, "networkpolicy": spec.name, "configmap": f"{spec.name}-spec"}


def pod_spec(spec: JobSpec) -> dict[str, Any]:
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


def check_paths(spec: JobSpec) -> None:
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
