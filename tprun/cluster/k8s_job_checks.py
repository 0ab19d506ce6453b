"""Checks on the Indexed Job: its counts and failure policy, and what a TP group needs of it (every pod at
once, a headless Service that names them, the ConfigMap it mounts)."""

from __future__ import annotations

from collections.abc import Iterator

from tprun.cluster.k8s_pod_checks import check_at_least, check_enum, check_labels, check_pod

MAX_INDEXED_COMPLETIONS = 100_000


def check_job(job: dict, by_kind: dict[str, list[dict]]) -> Iterator[str]:
    spec = job.get("spec", {})
    for field in ("parallelism", "completions", "backoffLimit", "backoffLimitPerIndex", "maxFailedIndexes",
                  "ttlSecondsAfterFinished"):
        yield from check_at_least(f"spec.{field}", spec.get(field), 0)
    yield from check_at_least("spec.activeDeadlineSeconds", spec.get("activeDeadlineSeconds"), 1)
    yield from check_enum("spec.completionMode", spec.get("completionMode"), "completionMode")
    yield from check_enum("spec.podReplacementPolicy", spec.get("podReplacementPolicy"), "podReplacementPolicy")
    completions = spec.get("completions")
    if spec.get("completionMode") == "Indexed":
        if not isinstance(completions, int) or not 1 <= completions <= MAX_INDEXED_COMPLETIONS:
            yield f"spec.completions: an Indexed Job needs 1..{MAX_INDEXED_COMPLETIONS}, got {completions!r}"
        elif len(f"{job['metadata'].get('name', '')}-{completions - 1}") > 63:
            yield "metadata.name: pod hostnames '<name>-<index>' must fit 63 characters; shorten the name"
    template = spec.get("template", {})
    pod = template.get("spec", {})
    yield from _check_failure_policy(spec, pod)
    yield from check_labels("spec.template.metadata.labels", template.get("metadata", {}).get("labels", {}))
    yield from check_enum("spec.template.spec.restartPolicy", pod.get("restartPolicy"), "jobRestartPolicy")
    yield from (f"spec.template.spec.{p}" for p in check_pod(pod))
    yield from _check_tprun_rules(job, spec, template, by_kind)


def _check_failure_policy(spec: dict, pod: dict) -> Iterator[str]:
    policy = spec.get("podFailurePolicy")
    if not policy:
        return
    if pod.get("restartPolicy") != "Never":
        yield "spec.podFailurePolicy needs spec.template.spec.restartPolicy: Never"
    if spec.get("podReplacementPolicy", "Failed") != "Failed":
        yield "spec.podReplacementPolicy must be Failed when spec.podFailurePolicy is set"
    containers = {c.get("name") for c in pod.get("containers", [])}
    for i, rule in enumerate(policy.get("rules", [])):
        path = f"spec.podFailurePolicy.rules[{i}]"
        yield from check_enum(f"{path}.action", rule.get("action"), "action")
        if rule.get("action") == "FailIndex" and spec.get("backoffLimitPerIndex") is None:
            yield f"{path}.action: FailIndex needs spec.backoffLimitPerIndex"
        codes = rule.get("onExitCodes")
        if (codes is None) == (rule.get("onPodConditions") is None):
            yield f"{path}: give exactly one of onExitCodes and onPodConditions"
        if codes is not None:
            yield from check_enum(f"{path}.onExitCodes.operator", codes.get("operator"), "operator")
            values = codes.get("values", [])
            if not values or len(set(values)) != len(values) or values != sorted(values):
                yield f"{path}.onExitCodes.values: {values!r} must be non-empty, unique and sorted"
            if codes.get("operator") == "In" and 0 in values:
                yield f"{path}.onExitCodes.values: 0 cannot be used with operator In"
            if "containerName" in codes and codes["containerName"] not in containers:
                yield f"{path}.onExitCodes.containerName: no container named {codes['containerName']!r}"
        for j, cond in enumerate(rule.get("onPodConditions") or []):
            yield from check_enum(f"{path}.onPodConditions[{j}].status", cond.get("status", "True"),
                             "podConditionStatus")


def _check_tprun_rules(job: dict, spec: dict, template: dict, by_kind: dict[str, list[dict]]) -> Iterator[str]:
    """What a TP group needs: every pod at once, and a headless Service that names them."""
    pod = template.get("spec", {})
    if spec.get("completionMode") != "Indexed":
        return
    if spec.get("parallelism") != spec.get("completions"):
        yield (f"spec.parallelism ({spec.get('parallelism')}) must equal spec.completions "
               f"({spec.get('completions')}): the ranks of a job wait for each other, so all pods must run at once")
    subdomain = pod.get("subdomain")
    services = {s["metadata"]["name"]: s for s in by_kind.get("Service", [])}
    if subdomain is None:
        yield "spec.template.spec.subdomain is not set: pod 0's name '<job>-0.<service>' will never resolve"
    elif services and subdomain not in services:
        yield f"spec.template.spec.subdomain {subdomain!r} names no Service in these manifests"
    elif subdomain in services:
        svc = services[subdomain]["spec"]
        if svc.get("clusterIP") != "None":
            yield f"Service {subdomain!r} must be headless (clusterIP: None) to publish per-pod DNS names"
        if not svc.get("publishNotReadyAddresses"):
            yield (f"Service {subdomain!r} needs publishNotReadyAddresses: true, or pod names resolve only "
                   "once pods are Ready")
        labels = template.get("metadata", {}).get("labels", {})
        if any(labels.get(k) != v for k, v in svc.get("selector", {}).items()):
            yield f"Service {subdomain!r} selector {svc.get('selector')} does not match the pod template labels"
    maps = {c["metadata"]["name"]: c for c in by_kind.get("ConfigMap", [])}
    for vol in pod.get("volumes", []):
        ref = vol.get("configMap", {})
        if ref and maps and ref.get("name") not in maps and not ref.get("optional"):
            yield f"volume {vol.get('name')!r} refers to ConfigMap {ref.get('name')!r}, not in these manifests"
        for item in ref.get("items", []) if ref.get("name") in maps else []:
            if item.get("key") not in maps[ref["name"]].get("data", {}):
                yield f"volume {vol.get('name')!r}: ConfigMap {ref['name']!r} has no key {item.get('key')!r}"
