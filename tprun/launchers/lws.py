"""LeaderWorkerSet: one group of pods is one job; the leader (worker index 0) hosts rank 0.

LWS (>= 0.6) injects all three variables; LWS_LEADER_ADDRESS is the leader's DNS name
(`<lws>-<group>.<lws>.<namespace>`), which, as for Indexed Jobs, may resolve only after pods start.
"""

from __future__ import annotations

from typing import ClassVar

from tprun.launchers.pod import PodLauncher


class LWSLauncher(PodLauncher):
    name = "lws"
    env: ClassVar[dict[str, str]] = {
        "pod_index": "LWS_WORKER_INDEX",
        "num_pods": "LWS_GROUP_SIZE",
        "master_addr": "LWS_LEADER_ADDRESS",
        **PodLauncher.PER_POD_ENV,
    }
    required = ("LWS_LEADER_ADDRESS", "LWS_GROUP_SIZE")
    env_hint = (
        "LWS sets LWS_WORKER_INDEX from 0.6 on; on older LWS add it to the pod template from the "
        "downward API: fieldRef metadata.labels['leaderworkerset.sigs.k8s.io/worker-index']"
    )

    def dns_hint(self) -> str:
        return (
            "The leader pod may not be scheduled yet (kubectl get pods -l "
            "leaderworkerset.sigs.k8s.io/worker-index=0); raise TPRUN_DNS_TIMEOUT_S if pods start slowly"
        )
