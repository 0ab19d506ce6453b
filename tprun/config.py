"""Configuration at the edges: pydantic models for the engine, parallelism, sampling and job specs.

Inside the hot path the engine copies what it needs into plain dataclasses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Dtype = Literal["auto", "float32", "float64", "bfloat16", "float16"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SamplingParams(_Strict):
    """vLLM-compatible sampling parameters. temperature 0 means greedy."""

    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, description="-1 or 0 disables top-k")
    max_tokens: int = Field(16, gt=0)
    seed: int | None = None
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int) -> int:
        if v < -1:
            raise ValueError("top_k must be -1 (disabled), 0 (disabled) or a positive integer")
        return v


class ParallelConfig(_Strict):
    tensor_parallel_size: int = Field(1, ge=1)
    data_parallel_size: int = Field(1, ge=1)

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.data_parallel_size


class EngineConfig(_Strict):
    model: str
    dtype: Dtype = "auto"
    seed: int = 0
    block_size: int = Field(16, ge=1)
    max_num_seqs: int = Field(256, ge=1)
    max_num_batched_tokens: int = Field(8192, ge=1)
    max_model_len: int | None = Field(None, ge=1)
    # Fraction of free device memory (CUDA) the KV cache may take; on CPU the budget is kv_cache_memory.
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    kv_cache_memory: int | None = Field(None, ge=1, description="bytes for the KV cache on this rank")
    num_gpu_blocks_override: int | None = Field(None, ge=1)
    enforce_eager: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    distributed_executor_backend: Literal["uni", "external_launcher"] = "external_launcher"
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    # Every this many steps the ranks of a TP group compare a hash of their sampled tokens (0: never).
    divergence_check_interval: int = Field(16, ge=0)
    dist_timeout_s: float = Field(300.0, gt=0)

    @field_validator("model")
    @classmethod
    def _model_dir(cls, v: str) -> str:
        return str(v)


class Resources(_Strict):
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    procs_per_node: int | None = Field(None, ge=1, description="processes per node; default gpus or 1")
    cpus_per_proc: int = Field(1, ge=1)
    memory: str | None = Field(None, description="per node, Slurm/Kubernetes style (e.g. 64G / 64Gi)")

    @property
    def processes_per_node(self) -> int:
        return self.procs_per_node or max(self.gpus_per_node, 1)


class SlurmOptions(_Strict):
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = Field("01:00:00", description="time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS")
    constraint: str | None = None
    extra_sbatch: list[str] = Field(default_factory=list, description="extra sbatch options ('--x=y')")
    setup: list[str] = Field(default_factory=list, description="shell lines run before srun")
    srun_args: list[str] = Field(default_factory=list, description="extra srun options ('--x=y')")
    # The sbatch tasks run `python -m tprun run`; it must find tprun (a venv's python, or PATH).
    # submit (submitit) defaults to the submitting interpreter unless this is set explicitly.
    python: str = "python3"
    chdir: str | None = Field(None, description="working directory of the job (relative paths start here)")
    # Sent to every task this long before the time limit: tprun stops claiming work, finishes the chunk in
    # flight and exits 75, and the job requeues itself (at most max_requeues times) to resume.
    signal: str = "USR1@90"
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

    @field_validator("extra_sbatch", "srun_args")
    @classmethod
    def _options(cls, v: list[str]) -> list[str]:
        for opt in v:
            if not opt.lstrip().startswith("-"):
                raise ValueError(f"{opt!r} is not an option; write it as '--name=value' (e.g. '--exclusive')")
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
    name: str
    mount_path: str
    pvc: str | None = None
    host_path: str | None = None
    read_only: bool = False


class KubernetesOptions(_Strict):
    namespace: str = "default"
    image: str = "tprun:latest"
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    gpu_resource: str = "nvidia.com/gpu"
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    volumes: list[Volume] = Field(default_factory=list)
    service_account: str | None = None
    master_port: int = Field(29500, gt=0, lt=65536)
    dns_timeout_s: float = Field(300.0, gt=0, description="how long pods wait for pod 0's DNS name")
    working_dir: str | None = Field(None, description="container working dir; relative spec paths start here")
    run_as_user: int = Field(1000, ge=1, description="non-root uid (and gid) the container runs as")


class JobSpec(_Strict):
    """What `tprun run|render|submit` take from a YAML file; CLI flags override fields."""

    name: str = Field("tprun", pattern=r"^[a-z0-9]([-a-z0-9]{0,40}[a-z0-9])?$")
    model: str
    input: str
    output: str
    dtype: Dtype = "auto"
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    engine: dict[str, Any] = Field(default_factory=dict, description="extra EngineConfig fields")
    resources: Resources = Field(default_factory=Resources)
    slurm: SlurmOptions = Field(default_factory=SlurmOptions)
    kubernetes: KubernetesOptions = Field(default_factory=KubernetesOptions)
    chunk_size: int = Field(64, ge=1, description="records per work chunk claimed by a TP group")
    on_bad_input: Literal["skip", "fail"] = "skip"

    def check_resources(self) -> None:
        """Render and submit need the resources to launch exactly tp * dp processes."""
        procs = self.resources.nodes * self.resources.processes_per_node
        if procs != self.parallel.world_size:
            raise ValueError(
                f"resources give {procs} processes (nodes({self.resources.nodes}) * procs_per_node"
                f"({self.resources.processes_per_node})) but parallel needs tp"
                f"({self.parallel.tensor_parallel_size}) * dp({self.parallel.data_parallel_size})"
                f" = {self.parallel.world_size}; set resources.nodes / resources.procs_per_node to match"
            )

    @classmethod
    def from_yaml(cls, path: str | Path) -> JobSpec:
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"job spec {path} does not exist") from None
        if not isinstance(data, dict):
            raise ValueError(f"job spec {path} must be a YAML mapping, got {type(data).__name__}")
        return cls.model_validate(data)

    def engine_config(self) -> EngineConfig:
        return EngineConfig(model=self.model, dtype=self.dtype, parallel=self.parallel, **self.engine)
