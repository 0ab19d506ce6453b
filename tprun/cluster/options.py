"""Options only the submit host reads: what to ask the cluster for (resources, Slurm, Kubernetes).

They are fields of JobSpec (tprun/config.py re-exports them), but nothing inside a rank reads them:
a rank learns its place from its launcher's environment (tprun/launchers/).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tprun.cluster.spec_rules import (
    DNSLabel,
    DNSSubdomain,
    LabelValue,
    Option,
    QualifiedName,
    Text,
    no_control_anywhere,
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Resources(_Strict):
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    procs_per_node: int | None = Field(None, ge=1, description="processes per node; default gpus or 1")
    cpus_per_proc: int = Field(1, ge=1)
    memory: Text | None = Field(None, description="per node, Slurm/Kubernetes style (e.g. 64G / 64Gi)")

    @property
    def processes_per_node(self) -> int:
        return self.procs_per_node or max(self.gpus_per_node, 1)


class SlurmOptions(_Strict):
    partition: Text | None = None
    account: Text | None = None
    qos: Text | None = None
    time: Text = Field("01:00:00", description="time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS")
    constraint: Text | None = None
    extra_sbatch: list[Option] = Field(default_factory=list, description="extra sbatch options ('--x=y')")
    setup: list[Text] = Field(default_factory=list, description="shell lines run before srun")
    srun_args: list[Option] = Field(default_factory=list, description="extra srun options ('--x=y')")
    # The sbatch tasks run `python -m tprun run`; it must find tprun (a venv's python, or PATH).
    # submit (submitit) defaults to the submitting interpreter unless this is set explicitly.
    python: Text = "python3"
    chdir: Text | None = Field(None, description="working directory of the job (relative paths start here)")
    # Sent to every task this long before the time limit: tprun stops claiming work, finishes the chunk in
    # flight and exits 75, and the job requeues itself (at most max_requeues times) to resume.
    signal: Text = "USR1@90"
    requeue: bool = True
    max_requeues: int = Field(5, ge=0)

    @field_validator("time")
    @classmethod
    def _time(cls, v: str) -> str:
        cls.minutes(v)
        return v

    @field_validator("signal")
    @classmethod
    def _signal(cls, v: str) -> str:
        import re

        if not re.fullmatch(r"(SIG)?(USR1|USR2|TERM|INT)@[0-9]+", v):
            raise ValueError(
                f"signal {v!r} must be SIGNAL@SECONDS with SIGNAL one of USR1, USR2, TERM, INT (the "
                "signals on which tprun stops cleanly), e.g. 'USR1@90'"
            )
        return v

    @property
    def time_minutes(self) -> int:
        return self.minutes(self.time)

    @staticmethod
    def minutes(v: str) -> int:
        """Slurm's --time formats, in whole minutes (rounded up)."""
        import re

        m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", v.strip())
        if not m:
            raise ValueError(f"time {v!r} is not a Slurm time limit; use MM, HH:MM:SS or D-HH:MM:SS")
        days, a, b, c = m.groups()
        if days is not None:  # D-HH[:MM[:SS]]
            secs = int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
        elif c is not None:  # HH:MM:SS
            secs = int(a) * 3600 + int(b) * 60 + int(c)
        else:  # MM[:SS]
            secs = int(a) * 60 + int(b or 0)
        if secs <= 0:
            raise ValueError(f"time {v!r} must be positive")
        return -(-secs // 60)

    @property
    def signal_name(self) -> str:
        return self.signal.split("@")[0].removeprefix("SIG")

    @property
    def signal_seconds(self) -> int:
        return int(self.signal.split("@")[1])


class Volume(_Strict):
    name: DNSLabel
    mount_path: Text
    pvc: DNSSubdomain | None = None
    host_path: Text | None = None
    read_only: bool = False


# Linux's default net.ipv4.ip_local_port_range. The pods set it (a namespaced, "safe" sysctl), so the
# ports gloo and NCCL listen on (bound to port 0) are known, and the NetworkPolicy admits only those.
EPHEMERAL_PORTS = (32768, 60999)


class KubernetesOptions(_Strict):
    namespace: DNSLabel = "default"
    image: Text = "tprun:latest"
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    gpu_resource: QualifiedName = "nvidia.com/gpu"
    node_selector: dict[QualifiedName, LabelValue] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    volumes: list[Volume] = Field(default_factory=list)
    # Rendered with the job: ingress only from the job's own pods, egress only to them and to DNS.
    network_policy: bool = True
    service_account: DNSSubdomain | None = None
    # Rank 0's rendezvous store; the NetworkPolicy admits it and the pods' ephemeral ports (gloo, NCCL).
    master_port: int = Field(29500, ge=1024, lt=65536, description="unprivileged, outside EPHEMERAL_PORTS")
    dns_timeout_s: float = Field(300.0, gt=0, description="how long pods wait for pod 0's DNS name")
    working_dir: Text | None = Field(None, description="container working dir; relative spec paths start here")
    run_as_user: int = Field(1000, ge=1, description="non-root uid (and gid) the container runs as")

    @field_validator("master_port")
    @classmethod
    def _master_port(cls, v: int) -> int:
        low, high = EPHEMERAL_PORTS
        if low <= v <= high:
            raise ValueError(f"{v} is in the pods' ephemeral port range {low}-{high}, where an outgoing "
                             "connection or a gloo/NCCL listener may already hold it; pick one below "
                             f"{low} (default 29500)")
        return v

    @field_validator("tolerations")
    @classmethod
    def _tolerations(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return no_control_anywhere(v)
