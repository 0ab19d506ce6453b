"""Device choice survives GPU masking: one visible GPU is ours; LOCAL_RANK past the GPUs is an error."""

from __future__ import annotations

import pytest
import torch

from tprun.worker.device import select_device


def _gpus(monkeypatch, n: int) -> None:
    # No CUDA on CI machines: pretend the driver reports n devices (this is the only fake here).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


def test_single_visible_gpu_is_used_whatever_local_rank_says(monkeypatch):
    _gpus(monkeypatch, 1)
    assert select_device("auto", local_rank=3) == torch.device("cuda", 0)


def test_several_visible_gpus_are_indexed_by_local_rank(monkeypatch):
    _gpus(monkeypatch, 4)
    assert select_device("auto", local_rank=2) == torch.device("cuda", 2)


def test_local_rank_beyond_visible_gpus_names_both_numbers(monkeypatch):
    _gpus(monkeypatch, 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(RuntimeError, match=r"LOCAL_RANK 3 but only 2 CUDA devices.*CUDA_VISIBLE_DEVICES=0,1"):
        select_device("auto", local_rank=3)


def test_no_gpu_falls_back_to_cpu_unless_cuda_is_demanded(monkeypatch):
    _gpus(monkeypatch, 0)
    assert select_device("auto", local_rank=0) == torch.device("cpu")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        select_device("cuda", local_rank=0)
