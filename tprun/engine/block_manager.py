"""Paged KV-cache bookkeeping: which physical blocks each sequence owns.

Free blocks are handed out lowest id first so that every rank, starting from the same state and
seeing the same calls, builds identical block tables.
"""

from __future__ import annotations

import heapq

from tprun.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks))
        heapq.heapify(self._free)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_to_grow(self, seq: Sequence, num_new_tokens: int) -> int:
        needed = (seq.num_cached_tokens + num_new_tokens + self.block_size - 1) // self.block_size
        return max(0, needed - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_to_grow(seq, num_new_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        for _ in range(self.blocks_to_grow(seq, num_new_tokens)):
            seq.block_table.append(heapq.heappop(self._free))

    def free(self, seq: Sequence) -> None:
        for block in seq.block_table:
            heapq.heappush(self._free, block)
        seq.block_table = []
        seq.num_cached_tokens = 0
