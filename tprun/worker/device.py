"""Device and dtype choice, robust to GPU masking (CUDA_VISIBLE_DEVICES, Slurm, Kubernetes)."""

from __future__ import annotations

import os

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


def select_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    n = torch.cuda.device_count()
    if n == 0:
        raise RuntimeError("device 'cuda' was asked for but no CUDA device is visible")
    if n == 1:
        # The launcher masked all but one GPU for this process: it is ours, whatever LOCAL_RANK says.
        return torch.device("cuda", 0)
    if local_rank >= n:
        raise RuntimeError(
            f"LOCAL_RANK {local_rank} but only {n} CUDA devices are visible "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); run at most {n} "
            "processes per node or expose one GPU per process"
        )
    return torch.device("cuda", local_rank)


def resolve_dtype(name: str, hf_config, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device.type != "cuda":
        return torch.float32
    saved = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(saved, str):
        saved = DTYPES.get(saved)
    return saved if saved in (torch.float16, torch.bfloat16) else torch.bfloat16
