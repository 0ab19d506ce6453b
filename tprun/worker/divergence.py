"""Catches TP ranks that stopped agreeing: every N steps they compare a hash of the sampled tokens.

Ranks of a TP group never exchange control messages; they rely on making identical decisions. If
that ever breaks (non-deterministic kernel, corrupted memory, a bug), the ranks would silently feed
different batches into the same collectives. One tiny all_gather every N steps turns that into an
error naming the step and the ranks.
"""

from __future__ import annotations

import os
import zlib

import torch
import torch.distributed as dist


class DivergenceError(RuntimeError):
    pass


class DivergenceDetector:
    def __init__(self, interval: int, tp_size: int, tp_cpu_group, tp_group_ranks: list[int], rank: int) -> None:
        self.interval = interval if tp_size > 1 else 0
        self.group = tp_cpu_group
        self.ranks = tp_group_ranks
        self.step = 0
        self._hash = 0
        # Test-only: make one rank lie, to prove the detector fires.
        self._perturb = os.environ.get("TPRUN_TEST_PERTURB_RANK") == str(rank)
        self._perturb_step = int(os.environ.get("TPRUN_TEST_PERTURB_STEP", "3"))

    def observe(self, tokens: list[int]) -> list[int]:
        self.step += 1
        if self._perturb and self.step == self._perturb_step and tokens:
            tokens = [tokens[0] + 1, *tokens[1:]]
        if not self.interval:
            return tokens
        self._hash = zlib.crc32(repr((self._hash, tokens)).encode())
        if self.step % self.interval == 0:
            self.compare()
        return tokens

    def compare(self) -> None:
        mine = torch.tensor([self._hash], dtype=torch.int64)
        every = [torch.zeros_like(mine) for _ in self.ranks]
        dist.all_gather(every, mine, group=self.group)
        values = [int(t) for t in every]
        if len(set(values)) > 1:
            groups: dict[int, list[int]] = {}
            for r, v in zip(self.ranks, values):
                groups.setdefault(v, []).append(r)
            raise DivergenceError(
                f"tensor-parallel ranks diverged by step {self.step}: ranks "
                + " vs ".join(str(g) for g in groups.values())
                + " sampled different tokens since the last check; the job cannot continue"
            )
