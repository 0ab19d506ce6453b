"""Kubernetes Indexed Job: pod i of Job J has JOB_COMPLETION_INDEX=i and hostname J-i.

With `subdomain: S` in the pod template and a headless Service S, the name `J-0.S` (or the
namespaced `J-0.S.NS.svc`) resolves to pod 0, which hosts rank 0. The Job controller sets only the
index; the rest comes from variables the rendered manifest sets (k8s_pod.py).
"""

from __future__ import annotations

from typing import ClassVar

from tprun.launchers.pod import PodLauncher


class KubernetesLauncher(PodLauncher):
    name = "kubernetes"
    env: ClassVar[dict[str, str]] = {
        "pod_index": "JOB_COMPLETION_INDEX",
        "num_pods": "TPRUN_NUM_PODS",
        "job_name": "TPRUN_JOB_NAME",
        "service": "TPRUN_SERVICE",
        "namespace": "TPRUN_NAMESPACE",
        **PodLauncher.PER_POD_ENV,
    }
    required = ("JOB_COMPLETION_INDEX",)
    env_hint = "the Job manifest from `tprun render k8s SPEC` sets it; add it if you wrote your own"

    @property
    def master_addr(self) -> str:
        host = f"{self._get('job_name')}-0.{self._get('service')}"
        namespace = self.environ.get(self.env["namespace"])
        return f"{host}.{namespace}.svc" if namespace else host

    def dns_hint(self) -> str:
        job, svc = self.environ.get("TPRUN_JOB_NAME", "JOB"), self.environ.get("TPRUN_SERVICE", "SVC")
        return (
            f"Check that the headless Service {svc!r} exists in this namespace with "
            f"publishNotReadyAddresses: true, that the pod template's subdomain is {svc!r}, and that pod "
            f"{job}-0 is scheduled (kubectl get pods -l batch.kubernetes.io/job-name={job}); raise "
            "kubernetes.dns_timeout_s in the spec if pods start slowly"
        )
