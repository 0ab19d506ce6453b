"""`tprun.submit(spec, backend=...)`: hand a JobSpec to the cluster the user already has."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from tprun.cluster.handle import JobHandle
from tprun.config import JobSpec

Backend = Literal["slurm", "kubernetes", "k8s"]


def submit(spec: JobSpec | str | Path, backend: Backend = "slurm", **options) -> JobHandle:
    if not isinstance(spec, JobSpec):
        spec = JobSpec.from_yaml(spec)
    spec.check()
    if backend == "slurm":
        from tprun.cluster.slurm_submit import submit_slurm

        return submit_slurm(spec, **options)
    if backend in ("kubernetes", "k8s"):
        from tprun.cluster.k8s_submit import submit_kubernetes

        return submit_kubernetes(spec, **options)
    raise ValueError(f"unknown backend {backend!r}; choose 'slurm' or 'kubernetes'")
