"""The tensor-parallel group a layer shards over, passed explicitly (no global state)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class TPGroup:
    """One instance is shared by every layer of a model, so re-initialising the process group
    (reinitialize_distributed) only has to swap `group` here."""

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None  # None with size 1: no collectives at all

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's shard along the last dimension, in rank order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(
            f"{what} ({numerator}) is not divisible by the tensor-parallel size ({denominator}); "
            f"choose a tensor-parallel size that divides {numerator}"
        )
    return numerator // denominator
