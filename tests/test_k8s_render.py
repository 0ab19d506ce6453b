"""`tprun render k8s`: the manifests a user applies, pinned by golden files and checked like the API would.

Regenerate the golden files after an intended change with TPRUN_UPDATE_GOLDEN=1.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tprun.cluster.k8s_checks import ManifestError, check_manifests
from tprun.cluster.k8s_pod_checks import parse_quantity, restricted_violations
from tprun.cluster.k8s_render import manifests_yaml, render_manifests
from tprun.config import JobSpec

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden"
EXAMPLE = ROOT / "examples" / "job.yaml"
KV = [Path(sys.executable).parent / "kubernetes-validate"]
# Every Kubernetes minor from 1.31 to the newest the installed kubernetes-validate knows.
VERSIONS = sorted({v.rsplit(".", 1)[0] for v in kubernetes_validate.utils.all_versions()
                   if tuple(map(int, v.split(".")[:2])) >= (1, 31)}, key=lambda v: tuple(map(int, v.split("."))))

GPU_SPEC = {
    "name": "llama70b", "model": "/models/llama-3-70b", "input": "/data/prompts.jsonl", "output": "/results/run1",
    "dtype": "bfloat16", "parallel": {"tensor_parallel_size": 8, "data_parallel_size": 2},
    "sampling": {"temperature": 0.8, "top_p": 0.9, "max_tokens": 512, "seed": 7},
    "resources": {"nodes": 4, "gpus_per_node": 4, "cpus_per_proc": 8, "memory": "480G"},
    "kubernetes": {
        "namespace": "inference", "image": "registry.example.com/tprun:0.1.0", "image_pull_policy": "Always",
        "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "volumes": [{"name": "models", "mount_path": "/models", "pvc": "models", "read_only": True},
                    {"name": "data", "mount_path": "/data", "pvc": "prompts", "read_only": True},
                    {"name": "results", "mount_path": "/results", "pvc": "results-rwx"}],
        "service_account": "tprun-runner", "master_port": 23456, "dns_timeout_s": 600,
    },
}
MINIMAL_SPEC = {"name": "mini", "model": "/m/demo", "input": "/m/in.jsonl", "output": "/out/x",
                "kubernetes": {"volumes": [{"name": "m", "mount_path": "/m", "pvc": "m", "read_only": True},
                                           {"name": "out", "mount_path": "/out", "pvc": "out"}]}}
GOLDENS = {"k8s_gpu.yaml": GPU_SPEC, "k8s_minimal.yaml": MINIMAL_SPEC}


def example() -> JobSpec:
    return JobSpec.from_yaml(EXAMPLE)


def kinds(docs: list[dict]) -> dict[str, dict]:
    return {d["kind"]: d for d in docs}


@pytest.mark.parametrize("name", GOLDENS)
def test_render_matches_golden_file(name):
    text = manifests_yaml(JobSpec.model_validate(GOLDENS[name]))
    if os.environ.get("TPRUN_UPDATE_GOLDEN"):
        (GOLDEN / name).write_text(text)
    assert text == (GOLDEN / name).read_text(), f"re-render with TPRUN_UPDATE_GOLDEN=1 if {name} changed on purpose"


def test_deploy_job_yaml_is_the_render_of_the_example_spec():
    assert (ROOT / "deploy" / "job.yaml").read_text() == manifests_yaml(example()), (
        "deploy/job.yaml is stale: python -m tprun render k8s examples/job.yaml > deploy/job.yaml")


def test_cli_render_prints_the_manifests():
    out = subprocess.run([sys.executable, "-m", "tprun", "render", "k8s", str(EXAMPLE)], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert out == manifests_yaml(example())


@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_pass_kubernetes_validate_strict(version):
    files = [ROOT / "deploy" / "job.yaml", *(GOLDEN / name for name in GOLDENS)]
    r = subprocess.run([*map(str, KV), "--strict", "--quiet", "-k", version, *map(str, files)],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_rendered_manifests_pass_our_checks():
    for spec in (example(), *(JobSpec.model_validate(s) for s in GOLDENS.values())):
        assert check_manifests(render_manifests(spec)) == []


# Mutations of a rendered manifest that kubernetes-validate --strict accepts and the API server (or, for
# the tprun rules, the job itself) would not: each must be caught by k8s_checks, naming the field.
GAPS = {
    "negative completions": ("Job", ["spec", "completions"], -2, "spec.completions"),
    "negative backoffLimit": ("Job", ["spec", "backoffLimit"], -1, "spec.backoffLimit: -1 must be an integer >= 0"),
    "enum: completionMode": ("Job", ["spec", "completionMode"], "indexed", "spec.completionMode: 'indexed' is not"),
    "enum: failure action": ("Job", ["spec", "podFailurePolicy", "rules", 1, "action"], "Restart",
                             "rules[1].action: 'Restart' is not one of"),
    "enum: exit code operator": ("Job", ["spec", "podFailurePolicy", "rules", 1, "onExitCodes", "operator"], "Nope",
                                 "onExitCodes.operator: 'Nope'"),
    "exit code 0 with In": ("Job", ["spec", "podFailurePolicy", "rules", 1, "onExitCodes", "operator"], "In",
                            "0 cannot be used with operator In"),
    "enum: Job restartPolicy": ("Job", ["spec", "template", "spec", "restartPolicy"], "Always",
                                "restartPolicy: 'Always' is not one of ['Never', 'OnFailure']"),
    "enum: imagePullPolicy": ("Job", ["spec", "template", "spec", "containers", 0, "imagePullPolicy"], "Sometimes",
                              "imagePullPolicy: 'Sometimes'"),
    "enum: seccomp": ("Job", ["spec", "template", "spec", "securityContext", "seccompProfile", "type"], "Default",
                      "seccompProfile.type: 'Default'"),
    "enum: emptyDir medium": ("Job", ["spec", "template", "spec", "volumes", 2, "emptyDir", "medium"], "memory",
                              "emptyDir.medium: 'memory'"),
    "enum: fieldRef": ("Job", ["spec", "template", "spec", "containers", 0, "env", 2, "valueFrom", "fieldRef",
                               "fieldPath"], "metadata.podIP", "fieldPath: 'metadata.podIP' is not supported"),
    "quantity: 4GB": ("Job", ["spec", "template", "spec", "containers", 0, "resources", "requests", "memory"], "4GB",
                      "requests['memory']: '4GB' is not a Kubernetes quantity"),
    "quantity: negative cpu": ("Job", ["spec", "template", "spec", "containers", 0, "resources", "requests", "cpu"],
                               "-1", "requests['cpu']: '-1' must not be negative"),
    "quantity: request above limit": ("Job", ["spec", "template", "spec", "containers", 0, "resources", "requests",
                                              "memory"], "8Gi", "requests['memory'] must not exceed limits"),
    "port out of range": ("Service", ["spec", "ports", 0, "port"], 70000, "port 70000 must be in 1..65535"),
    "uid 0 with runAsNonRoot": ("Job", ["spec", "template", "spec", "securityContext", "runAsUser"], 0,
                                "runAsNonRoot is true but runAsUser is 0"),
    "mount of a missing volume": ("Job", ["spec", "template", "spec", "containers", 0, "volumeMounts", 1, "name"],
                                  "scratch", "volumeMounts[1].name: no volume named 'scratch'"),
    "tprun: fewer pods at once than ranks": ("Job", ["spec", "parallelism"], 1,
                                             "spec.parallelism (1) must equal spec.completions (2)"),
    "tprun: subdomain without Service": ("Job", ["spec", "template", "spec", "subdomain"], "other",
                                         "subdomain 'other' names no Service"),
    "tprun: Service not headless": ("Service", ["spec", "clusterIP"], "10.96.7.7", "must be headless"),
    "tprun: DNS only when Ready": ("Service", ["spec", "publishNotReadyAddresses"], False,
                                   "needs publishNotReadyAddresses: true"),
    "tprun: selector misses the pods": ("Service", ["spec", "selector", "app.kubernetes.io/instance"], "other",
                                        "does not match the pod template labels"),
    "Service name starts with a digit": ("Service", ["metadata", "name"], "1tprun", "must be a DNS-1035 label"),
    "enum: policyType": ("NetworkPolicy", ["spec", "policyTypes", 0], "ingress", "policyTypes[0]: 'ingress' is not one of"),
    "policy: endPort below port": ("NetworkPolicy", ["spec", "ingress", 0, "ports", 1, "endPort"], 1000,
                                   "ingress[0].ports[1].endPort: 1000 needs a numeric port <= endPort"),
    "tprun: policy misses the pods": ("NetworkPolicy", ["spec", "podSelector", "matchLabels",
                                                        "app.kubernetes.io/instance"], "other",
                                      "spec.podSelector selects none of Job 'tprun-demo'"),
    "tprun: policy shuts out the store": ("NetworkPolicy", ["spec", "ingress", 0, "ports", 0, "port"], 29501,
                                          "spec.ingress: admits no TCP to port 29500 (MASTER_PORT)"),
    "tprun: ranks may not connect out": ("NetworkPolicy", ["spec", "egress", 0, "to", 0, "podSelector", "matchLabels",
                                                           "batch.kubernetes.io/job-name"], "other",
                                         "spec.egress: admits no TCP to port 29500"),
}


@pytest.mark.parametrize("case", GAPS)
def test_checks_catch_what_kubernetes_validate_misses(case):
    kind, path, value, message = GAPS[case]
    docs = copy.deepcopy(render_manifests(example()))
    target = kinds(docs)[kind]
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    kubernetes_validate.validate(kinds(docs)[kind], "1.31.0", strict=True)  # the schema lets it through
    problems = check_manifests(docs)
    assert any(message in p for p in problems), problems


def test_quantities_parse_like_the_api_server():
    assert parse_quantity("500m") == parse_quantity("0.5")
    assert parse_quantity("64Gi") == 64 * 2**30
    assert parse_quantity("1G") == 10**9
    assert parse_quantity("1e3") == 1000
    assert parse_quantity(2) == 2
    for bad in ("4GB", "1.5.2", "Gi", "", "1 Gi", "0x10", True):
        with pytest.raises(ValueError, match="not a Kubernetes quantity"):
            parse_quantity(bad)


def test_tp_failure_model_fails_the_whole_job_and_ignores_disruptions():
    job = kinds(render_manifests(example()))["Job"]["spec"]
    # One rank lost = the group lost: no per-index retry, any non-zero exit ends the Job at once.
    assert job["backoffLimit"] == 0
    assert "backoffLimitPerIndex" not in job
    rules = job["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert rules[1] == {"action": "FailJob",
                        "onExitCodes": {"containerName": "tprun", "operator": "NotIn", "values": [0]}}
    assert job["template"]["spec"]["restartPolicy"] == "Never"
    assert job["podReplacementPolicy"] == "Failed"
    assert job["completionMode"] == "Indexed" and job["completions"] == job["parallelism"] == 2


def test_pods_meet_the_restricted_pod_security_standard():
    pod = kinds(render_manifests(example()))["Job"]["spec"]["template"]["spec"]
    assert restricted_violations(pod) == []
    container = pod["containers"][0]
    assert pod["automountServiceAccountToken"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # With a read-only root the process needs a writable /tmp, and HOME there for library caches.
    tmp = next(v["name"] for v in pod["volumes"] if "emptyDir" in v and v["name"] == "tmp")
    assert {"name": tmp, "mountPath": "/tmp"} in container["volumeMounts"]
    assert {"name": "HOME", "value": "/tmp"} in container["env"]


def test_host_path_volume_is_reported_against_restricted():
    spec = JobSpec.model_validate({**MINIMAL_SPEC, "kubernetes": {"volumes": [
        {"name": "m", "mount_path": "/m", "host_path": "/srv/models", "read_only": True},
        {"name": "out", "mount_path": "/out", "pvc": "out"}]}})
    pod = kinds(render_manifests(spec))["Job"]["spec"]["template"]["spec"]
    assert restricted_violations(pod) == ["volumes[3] (m): hostPath volumes are not allowed"]


def test_pods_read_the_same_spec_from_the_configmap():
    for spec in (example(), JobSpec.model_validate(GPU_SPEC)):
        docs = kinds(render_manifests(spec))
        assert JobSpec.model_validate(yaml.safe_load(docs["ConfigMap"]["data"]["job.yaml"])) == spec
        container = docs["Job"]["spec"]["template"]["spec"]["containers"][0]
        assert container["command"][-3:] == ["tprun", "run", "/etc/tprun/job.yaml"]


def test_gpu_resources_and_placement():
    docs = kinds(render_manifests(JobSpec.model_validate(GPU_SPEC)))
    pod = docs["Job"]["spec"]["template"]["spec"]
    res = pod["containers"][0]["resources"]
    assert res == {"requests": {"cpu": "32", "memory": "480Gi", "nvidia.com/gpu": "4"},
                   "limits": {"memory": "480Gi", "nvidia.com/gpu": "4"}}
    assert pod["nodeSelector"] == GPU_SPEC["kubernetes"]["node_selector"]
    assert pod["tolerations"] == GPU_SPEC["kubernetes"]["tolerations"]
    assert pod["serviceAccountName"] == "tprun-runner"
    assert docs["Job"]["spec"]["completions"] == 4
    assert pod["containers"][0]["command"][:5] == ["python3", "-m", "tprun.launchers.fanout", "--nprocs", "4"]
    amd = JobSpec.model_validate({**GPU_SPEC, "kubernetes": {**GPU_SPEC["kubernetes"], "gpu_resource": "amd.com/gpu"}})
    res = kinds(render_manifests(amd))["Job"]["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert res["limits"]["amd.com/gpu"] == "4" and "nvidia.com/gpu" not in res["limits"]


def _with(spec: dict, **changes) -> dict:
    out = copy.deepcopy(spec)
    for dotted, value in changes.items():
        *head, last = dotted.split("__")
        target = out
        for key in head:
            target = target.setdefault(key, {})
        target[last] = value
    return out


@pytest.mark.parametrize(("spec", "error", "message"), [
    (_with(MINIMAL_SPEC, resources__memory="64GB"), ValueError, "resources.memory '64GB' is not understood"),
    (_with(MINIMAL_SPEC, output="/m/out"), ValueError, "output '/m/out' (in the pod: /m/out) is on no writable"),
    (_with(MINIMAL_SPEC, output="/tmp/out"), ValueError, "is on no writable volume"),
    (_with(MINIMAL_SPEC, model="models/demo"), ValueError,
     "model 'models/demo' is relative: make it absolute, or set kubernetes.working_dir"),
    (_with(MINIMAL_SPEC, kubernetes__volumes=[{"name": "out", "mount_path": "/out", "pvc": "o", "host_path": "/o"}]),
     ValueError, "kubernetes.volumes['out']: give pvc or host_path, not both"),
    (_with(MINIMAL_SPEC, kubernetes__volumes=[{"name": "out", "mount_path": "/out"}]), ValueError,
     "give pvc (a PersistentVolumeClaim name) or host_path"),
    (_with(MINIMAL_SPEC, kubernetes__volumes=[{"name": "out", "mount_path": "/tmp/o", "pvc": "o"}]), ValueError,
     "collides with /etc/tprun, /tmp or /dev/shm"),
    (_with(MINIMAL_SPEC, kubernetes__volumes=[{"name": "Out_1", "mount_path": "/out", "pvc": "o"}]), ValueError,
     "'Out_1' must be a DNS-1123 label"),  # refused by the spec itself, before the render
    (_with(MINIMAL_SPEC, name="7b"), ManifestError, "Service '7b': metadata.name '7b' must be a DNS-1035 label"),
    (_with(MINIMAL_SPEC, parallel__tensor_parallel_size=2), ValueError, "resources give 1 processes"),
    (_with(MINIMAL_SPEC, kubernetes__tolerations=[{"key": "gpu", "operator": "Exists", "effect": "NoScheduled"}]),
     ManifestError, "tolerations[0].effect: 'NoScheduled' is not one of"),
], ids=["memory-unit", "output-read-only", "output-ephemeral", "relative-path", "two-sources", "no-source",
        "mount-collision", "volume-name", "service-name", "resources-vs-tp", "toleration-effect"])
def test_spec_that_cannot_run_on_kubernetes_is_a_clear_error(spec, error, message):
    with pytest.raises(error) as e:
        render_manifests(JobSpec.model_validate(spec))
    assert message in str(e.value)
