"""Submit a JobSpec to Kubernetes with the official client: ConfigMap, Service, NetworkPolicy, then the Job.

The objects are the ones `tprun render k8s` prints, created in that order, so no pod starts before
the policy that guards its rendezvous port. Once the Job exists, the others get it as their owner,
so `kubectl delete job NAME` also removes them; `cancel()` deletes them all anyway (the Job in the
foreground, so its pods go first).
"""

from __future__ import annotations

import logging
from typing import Any

from tprun.cluster.handle import JobHandle, JobState
from tprun.cluster.k8s_pod import CONTAINER, names
from tprun.cluster.k8s_render import labels, render_manifests
from tprun.config import JobSpec

log = logging.getLogger(__name__)
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
# Job conditions that mean the job is over, or (1.31+) about to be: the pods are still stopping.
FINAL_CONDITIONS: dict[str, JobState] = {
    "Complete": "COMPLETED", "SuccessCriteriaMet": "COMPLETED", "Failed": "FAILED", "FailureTarget": "FAILED",
}


class SubmitError(RuntimeError):
    """The API server refused the job; the message says which object and why."""


def submit_kubernetes(
    spec: JobSpec,
    api_client: Any = None,
    *,
    kubeconfig: str | None = None,
    context: str | None = None,
    request_timeout_s: float = 30.0,
) -> KubernetesJob:
    """Create the job's objects; returns a handle. `api_client` defaults to kubeconfig / in-cluster."""
    if spec.parallel.groups == "independent":
        # A LeaderWorkerSet never completes (its pods restart) and its status says nothing of OUT/_SUCCESS,
        # which this handle would have to follow; not built yet.
        raise SubmitError("submit does not create LeaderWorkerSets (independent groups) yet: apply the render "
                          "instead (tprun render k8s SPEC > job.yaml && kubectl apply -f job.yaml), and delete "
                          "it once OUT/_SUCCESS exists")
    docs = render_manifests(spec)
    job = KubernetesJob(api_client or _default_client(kubeconfig, context), spec, request_timeout_s)
    job._create(docs)
    return job


class KubernetesJob(JobHandle):
    def __init__(self, api_client: Any, spec: JobSpec, request_timeout_s: float = 30.0) -> None:
        from kubernetes import client

        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.networking = client.NetworkingV1Api(api_client)
        self.namespace = spec.kubernetes.namespace
        self.names = names(spec)
        self.selector = ",".join(f"{k}={v}" for k, v in labels(spec).items())
        self.job_id = f"{self.namespace}/{self.names['job']}"
        self.timeout = request_timeout_s

    def _create(self, docs: list[dict]) -> None:
        create = {"ConfigMap": self.core.create_namespaced_config_map,
                  "Service": self.core.create_namespaced_service,
                  "NetworkPolicy": self.networking.create_namespaced_network_policy,
                  "Job": self.batch.create_namespaced_job}
        created: list[str] = []
        for doc in docs:  # render order: the Job last
            try:
                made = create[doc["kind"]](self.namespace, doc, _request_timeout=self.timeout)
            except Exception as e:
                self._delete(created)  # leave nothing half-made behind
                raise SubmitError(self._explain(doc["kind"], e)) from e
            created.append(doc["kind"].lower())
        self._adopt(made.metadata.uid, [kind for kind in created if kind != "job"])

    def _adopt(self, job_uid: str, kinds: list[str]) -> None:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        owner = {"metadata": {"ownerReferences": [{
            "apiVersion": "batch/v1", "kind": "Job", "name": self.names["job"], "uid": job_uid,
            "blockOwnerDeletion": False}]}}
        patches = {"configmap": self.core.patch_namespaced_config_map,
                   "service": self.core.patch_namespaced_service,
                   "networkpolicy": self.networking.patch_namespaced_network_policy}
        try:
            for kind in kinds:
                patches[kind](self.names[kind], self.namespace, owner,
                              _content_type="application/merge-patch+json", _request_timeout=self.timeout)
        except (ApiException, HTTPError, OSError) as e:  # the job runs fine without it; only `kubectl delete job` cleans up less
            log.warning("could not make Job %s the owner of its ConfigMap/Service/NetworkPolicy: %s", self.job_id, e)

    def _explain(self, kind: str, e: Exception) -> str:
        status, message = getattr(e, "status", None), _api_message(e)
        name = self.names[kind.lower()]
        where = f"{kind} {self.namespace}/{name}"
        if status == 409:
            return (f"{where} already exists: delete the old job (kubectl delete -n {self.namespace} "
                    f"job/{self.names['job']} service/{self.names['service']} "
                    f"networkpolicy/{self.names['networkpolicy']} configmap/{self.names['configmap']}) "
                    "or change the spec's name")
        if status in (401, 403):
            return f"not allowed to create {where} ({message}): check your kubeconfig user's RBAC in {self.namespace}"
        if status == 404:
            return f"cannot create {where}: {message} (does namespace {self.namespace!r} exist?)"
        if status is not None:
            return f"the API server rejected {where} (HTTP {status}): {message}"
        return f"could not reach the API server to create {where}: {e}"

    def status(self) -> JobState:
        from kubernetes.client.exceptions import ApiException

        try:
            job = self.batch.read_namespaced_job_status(self.names["job"], self.namespace,
                                                        _request_timeout=self.timeout)
        except ApiException as e:
            if e.status == 404:
                return "CANCELLED"  # deleted before it finished (a finished Job stays until deleted)
            raise
        if job.metadata.deletion_timestamp is not None:
            return "CANCELLED"
        st = job.status
        for cond in (st.conditions or []) if st else []:
            if cond.status == "True" and cond.type in FINAL_CONDITIONS:
                return FINAL_CONDITIONS[cond.type]
        # Pods have no readiness probe, so Ready means the container runs; active also counts pending pods.
        return "RUNNING" if st and (st.ready or 0) > 0 else "PENDING"

    def cancel(self) -> None:
        self._delete(["job", "service", "networkpolicy", "configmap"])

    def _delete(self, kinds: list[str]) -> None:
        from kubernetes.client.exceptions import ApiException

        calls = {"job": self.batch.delete_namespaced_job, "service": self.core.delete_namespaced_service,
                 "networkpolicy": self.networking.delete_namespaced_network_policy,
                 "configmap": self.core.delete_namespaced_config_map}
        for kind in kinds:
            # Foreground for the Job: it disappears only after its pods, so status() never misses them.
            policy = "Foreground" if kind == "job" else "Background"
            try:
                calls[kind](self.names[kind], self.namespace, propagation_policy=policy,
                            _request_timeout=self.timeout)
            except ApiException as e:
                if e.status != 404:
                    raise

    def logs(self) -> str:
        from kubernetes.client.exceptions import ApiException

        pods = self.core.list_namespaced_pod(self.namespace, label_selector=self.selector,
                                             _request_timeout=self.timeout).items

        def index(pod: Any) -> tuple[int, str]:
            value = (pod.metadata.annotations or {}).get(INDEX_ANNOTATION, "")
            return (int(value) if value.isdigit() else -1, pod.metadata.name)

        out = []
        for pod in sorted(pods, key=index):
            try:
                text = self.core.read_namespaced_pod_log(pod.metadata.name, self.namespace, container=CONTAINER,
                                                         _request_timeout=self.timeout)
            except ApiException as e:  # e.g. still pulling its image
                text = f"(no logs: {_api_message(e)})\n"
            out.append(f"==> pod {pod.metadata.name} (index {index(pod)[0]}) <==\n{text}")
        return "".join(out) if out else f"(no pods yet for job {self.job_id})\n"


def _api_message(e: Exception) -> str:
    import json

    try:
        return json.loads(getattr(e, "body", "") or "")["message"]
    except (ValueError, KeyError, TypeError):
        return str(getattr(e, "reason", None) or e)


def _default_client(kubeconfig: str | None, context: str | None) -> Any:
    from kubernetes import client, config

    try:
        config.load_kube_config(config_file=kubeconfig, context=context)
    except (config.ConfigException, OSError, TypeError) as kube_error:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            raise SubmitError(f"no Kubernetes credentials: {kube_error}; set KUBECONFIG (or pass "
                              "kubeconfig=/context=), or run inside a cluster") from None
    return client.ApiClient()
