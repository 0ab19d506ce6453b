"""Independent groups on Kubernetes: the LeaderWorkerSet that `tprun render k8s` writes.

Validated against the LWS v1 CRD's schema pinned in tests/schemas (jsonschema), its pod template as a
core/v1 PodTemplate with kubernetes-validate --strict, and its NetworkPolicy against the labels the LWS
controller puts on the pods. Set TPRUN_UPDATE_GOLDEN=1 to rewrite tests/golden/k8s_lws.yaml.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tprun.cluster.k8s_checks import check_manifests
from tprun.cluster.k8s_lws import GROUP_INDEX_LABEL
from tprun.cluster.k8s_network import LWS_NAME_LABEL
from tprun.cluster.k8s_pod_checks import restricted_violations
from tprun.cluster.k8s_render import manifests_yaml, render_manifests
from tprun.config import JobSpec

HERE = Path(__file__).parent
SCHEMA = yaml.safe_load((HERE / "schemas" / "leaderworkerset_v1.yaml").read_text())
GOLDEN = HERE / "golden" / "k8s_lws.yaml"
# 2 groups of TP=4 over 4 nodes of 2 GPUs: 2 pods per group, 2 processes per pod.
SPEC = {
    "name": "lws-eval", "model": "/models/m", "input": "/data/in.jsonl", "output": "/results/run1",
    "parallel": {"tensor_parallel_size": 4, "data_parallel_size": 2, "groups": "independent"},
    "resources": {"nodes": 4, "gpus_per_node": 2, "cpus_per_proc": 4},
    "kubernetes": {"namespace": "inference", "master_port": 23456,
                   "volumes": [{"name": "models", "mount_path": "/models", "pvc": "models", "read_only": True},
                               {"name": "data", "mount_path": "/data", "pvc": "prompts", "read_only": True},
                               {"name": "results", "mount_path": "/results", "pvc": "results-rwx"}]},
}


def docs() -> dict[str, dict]:
    return {d["kind"]: d for d in render_manifests(JobSpec.model_validate(SPEC))}


def test_render_matches_golden_file():
    text = manifests_yaml(JobSpec.model_validate(SPEC))
    if os.environ.get("TPRUN_UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


def test_the_leaderworkerset_validates_against_the_lws_crd_schema():
    rendered = docs()
    assert set(rendered) == {"ConfigMap", "NetworkPolicy", "LeaderWorkerSet"}  # LWS makes its own Service
    lws = rendered["LeaderWorkerSet"]
    jsonschema.validate(lws, SCHEMA)
    template = lws["spec"]["leaderWorkerTemplate"]
    assert lws["spec"]["replicas"] == 2 and template["size"] == 2
    assert template["restartPolicy"] == "RecreateGroupOnPodRestart"
    # the pod template, as the API server judges any PodTemplate, strictly (unknown fields fail)
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate",
                                  "metadata": {"name": "x", "namespace": "inference"},
                                  "template": template["workerTemplate"]}, "1.31.0", strict=True)
    for kind in ("ConfigMap", "NetworkPolicy"):
        kubernetes_validate.validate(rendered[kind], "1.31.0", strict=True)
    assert check_manifests(list(rendered.values())) == []
    assert restricted_violations(template["workerTemplate"]["spec"]) == []


@pytest.mark.parametrize("path, value", [
    (("spec", "leaderWorkerTemplate", "restartPolicy"), "RecreateGroupSometimes"),
    (("spec", "startupPolicy"), "WhenReady"),
    (("spec", "leaderWorkerTemplate", "sizes"), 2),
    (("spec", "replicas"), "2"),
])
def test_the_pinned_schema_rejects_what_lws_would(path, value):
    lws = copy.deepcopy(docs()["LeaderWorkerSet"])
    node = lws
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(lws, SCHEMA)


def test_pods_run_the_group_launcher_with_the_group_index_from_lws():
    pod = docs()["LeaderWorkerSet"]["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]
    container = pod["containers"][0]
    assert container["command"][-2:] == ["--groups", "independent"]
    assert "tprun.launchers.fanout" in container["command"]  # 2 processes per pod
    env = {e["name"]: e for e in container["env"]}
    assert env["TPRUN_GROUP_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == f"metadata.labels['{GROUP_INDEX_LABEL}']"
    assert env["TPRUN_PROCS_PER_POD"]["value"] == "2" and env["MASTER_PORT"]["value"] == "23456"
    # LWS injects these itself; a template value would fight the controller's
    assert not {"LWS_LEADER_ADDRESS", "LWS_GROUP_SIZE", "LWS_WORKER_INDEX", "TPRUN_JOB_NAME"} & set(env)
    assert pod["restartPolicy"] == "Always" and "subdomain" not in pod


def test_the_network_policy_admits_the_pods_of_every_group_and_only_them():
    rendered = docs()
    selector = rendered["NetworkPolicy"]["spec"]["podSelector"]["matchLabels"]
    template_labels = rendered["LeaderWorkerSet"]["spec"]["leaderWorkerTemplate"]["workerTemplate"]["metadata"]["labels"]
    for group in ("0", "1"):  # the labels the LWS controller gives a group's pods
        pod_labels = {**template_labels, LWS_NAME_LABEL: "lws-eval", GROUP_INDEX_LABEL: group,
                      "leaderworkerset.sigs.k8s.io/worker-index": "1"}
        assert all(pod_labels.get(k) == v for k, v in selector.items())
    assert selector[LWS_NAME_LABEL] == "lws-eval"  # not another set's pods with the same app labels
    # a policy that no longer selects the set's pods is caught by the checks render runs
    broken = copy.deepcopy(list(rendered.values()))
    for d in broken:
        if d["kind"] == "NetworkPolicy":
            d["spec"]["podSelector"]["matchLabels"][LWS_NAME_LABEL] = "other"
    assert any("selects none of LeaderWorkerSet 'lws-eval'" in p for p in check_manifests(broken))


def test_submit_refuses_independent_groups_with_what_to_do_instead():
    from tprun.cluster.k8s_submit import SubmitError, submit_kubernetes

    with pytest.raises(SubmitError, match="tprun render k8s SPEC > job.yaml && kubectl apply"):
        submit_kubernetes(JobSpec.model_validate(SPEC), api_client=object())


def test_groups_must_divide_the_nodes():
    bad = {**SPEC, "resources": {**SPEC["resources"], "nodes": 3, "procs_per_node": 8}}
    bad["parallel"] = {**SPEC["parallel"], "tensor_parallel_size": 12}
    with pytest.raises(ValueError, match=r"nodes\(3\) is not a multiple of dp"):
        render_manifests(JobSpec.model_validate(bad))
