"""Reading one rank's slice of a checkpoint tensor, so no rank ever materialises a whole sharded weight."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch


class CheckpointTensor(Protocol):
    """A tensor that is read only where it is indexed: a safetensors slice, or a plain torch.Tensor."""

    @property
    def shape(self) -> Sequence[int]: ...

    def __getitem__(self, index: tuple[slice, ...]) -> torch.Tensor: ...


def load_shard(dst: torch.Tensor, loaded: CheckpointTensor, dim: int, start: int, full_len: int) -> None:
    """Copy loaded[start : start + dst.shape[dim]] along `dim` into dst.

    full_len is the checkpoint's size along `dim` that the model config implies; the checkpoint's shape is
    checked against it first, so a config/checkpoint mismatch is an error and not a silent partial read.
    """
    expected = list(dst.shape)
    expected[dim] = full_len
    if list(loaded.shape) != expected:
        raise ValueError(
            f"shape {tuple(loaded.shape)} differs from the {tuple(expected)} that the model config implies"
        )
    if dst.shape[dim] == 0:
        return
    index = (slice(None),) * dim + (slice(start, start + dst.shape[dim]),)
    dst.copy_(loaded[index])


def load_replicated(param: torch.Tensor, loaded: CheckpointTensor) -> None:
    """Every rank holds the whole tensor (norm weights)."""
    load_shard(param.data, loaded, dim=0, start=0, full_len=param.shape[0])


class NarrowedTensor:
    """Part of a checkpoint tensor (a fused tensor's q, k or v rows), still read only where indexed."""

    def __init__(self, loaded: CheckpointTensor, dim: int, start: int, length: int):
        self._loaded, self._dim, self._start = loaded, dim, start
        shape = list(loaded.shape)
        if start + length > shape[dim]:
            raise ValueError(f"shape {tuple(shape)} is too small for rows [{start}, {start + length}) along dim {dim}")
        shape[dim] = length
        self.shape = tuple(shape)

    def __getitem__(self, index: tuple[slice, ...]) -> torch.Tensor:
        index = tuple(index) + (slice(None),) * (len(self.shape) - len(index))
        inner = index[self._dim]
        lo, hi, _ = inner.indices(self.shape[self._dim])
        moved = slice(self._start + lo, self._start + hi)
        return self._loaded[index[: self._dim] + (moved,) + index[self._dim + 1 :]]


def new_param(*shape: int) -> torch.nn.Parameter:
    """An uninitialised inference parameter; dtype and device come from the caller's defaults (build_model)."""
    return torch.nn.Parameter(torch.empty(*shape), requires_grad=False)
