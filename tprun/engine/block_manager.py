"""Paged KV-cache bookkeeping: which physical blocks each sequence owns, and automatic prefix caching.

A full block is named by a hash of its token ids chained with the previous block's hash, so equal
hashes mean equal prefixes; a sequence whose prompt starts with cached blocks shares them (reference
counted) instead of recomputing them. A block whose last owner is freed keeps its K/V and its hash
until its slot is needed again.

Every rank, starting from the same state and seeing the same calls, must build identical block
tables, so nothing here depends on timing or on the order of unordered containers:
- never-cached free blocks are handed out lowest id first;
- only when none is left is a free cached block evicted, least recently freed first; the blocks a
  sequence frees together are ordered last block first (as vLLM does: a chain is evicted from its
  tail, so the prefix other requests would hit stays longest).
"""

from __future__ import annotations

import hashlib
import heapq
import struct
from collections import OrderedDict

from tprun.engine.sequence import Sequence

ROOT_HASH = b"tprun-prefix-cache-v1"  # the "parent" of every sequence's first block


def hash_block(parent: bytes, token_ids: list[int]) -> bytes:
    """A stable name for a full block: the same on every rank, process and run (never Python's hash())."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free: list[int] = list(range(num_blocks))  # refcount 0 and no hash: a min-heap of ids
        heapq.heapify(self._free)
        self._evictable: OrderedDict[int, None] = OrderedDict()  # refcount 0 with a hash, LRU first
        self._ref_count = [0] * num_blocks
        self._block_hash: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}  # hash -> block holding it (looked up by key only)
        self._num_hashed: dict[int, int] = {}  # seq id -> how many of its leading blocks are registered
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds (cached ones included: they are reclaimed on demand)."""
        return len(self._free) + len(self._evictable)

    # -- prefix lookup --------------------------------------------------------------------------
    def cached_prefix(self, seq: Sequence) -> list[int]:
        """The blocks already holding the longest cached prefix of a sequence that holds none yet.

        At least its last token is left out so the step that computes it yields logits to sample from;
        the hit is whole blocks, so recomputing it never writes into a block other sequences read.
        A request that wants prompt logprobs must compute every prompt position: it gets no hit (vLLM).
        """
        if not self.enable_prefix_caching or seq.sampling.prompt_logprobs is not None:
            return []
        hits = []
        for block_hash in self._hashes(seq, (seq.num_tokens - 1) // self.block_size):
            block = self._cached.get(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def _hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The chained hashes of the sequence's first num_blocks full blocks (extended lazily)."""
        hashes, bs, prompt, p = seq.block_hashes, self.block_size, seq.prompt_token_ids, seq.num_prompt_tokens
        for i in range(len(hashes), num_blocks):
            start, end = i * bs, (i + 1) * bs  # sliced, not from seq.token_ids: that copies the whole context
            if end <= p:
                tokens = prompt[start:end]
            elif start >= p:
                tokens = seq.output_token_ids[start - p : end - p]
            else:
                tokens = prompt[start:] + seq.output_token_ids[: end - p]
            hashes.append(hash_block(hashes[-1] if hashes else ROOT_HASH, tokens))
        return hashes[:num_blocks]

    # -- allocation -----------------------------------------------------------------------------
    def allocate_slots(self, seq: Sequence, num_new_tokens: int, prefix: list[int] = ()) -> bool:
        """Give the sequence the cached `prefix` (from cached_prefix, for a sequence holding no blocks)
        and room for num_new_tokens more; False, changing nothing, when the free blocks are too few.

        Blocks that will be full once this step has run are registered in the cache now, so a request
        scheduled later in the same step (an n > 1 sibling) already shares them: every layer stores the
        step's new K/V before any attention reads the cache.
        """
        bs = self.block_size
        end = seq.num_computed_tokens + len(prefix) * bs + num_new_tokens
        grow = (end + bs - 1) // bs - len(seq.block_table) - len(prefix)
        if grow > 0 or prefix:  # most decode steps stay inside the last block: nothing to do
            # A hit on a free cached block takes it out of the pool the new blocks come from.
            reclaimed = sum(1 for b in prefix if self._ref_count[b] == 0)
            if grow > len(self._free) + len(self._evictable) - reclaimed:
                return False
            for block in prefix:
                if self._ref_count[block] == 0:
                    del self._evictable[block]
                self._ref_count[block] += 1
            seq.block_table.extend(prefix)
            seq.num_computed_tokens += len(prefix) * bs
            for _ in range(grow):
                block = self._take_free_block()
                self._ref_count[block] = 1
                seq.block_table.append(block)
        # A block holding a pending token (scheduling ahead) is named once the token's value is known.
        full = min(end, seq.num_known_tokens) // bs
        if self.enable_prefix_caching and full > self._num_hashed.get(seq.seq_id, 0):
            self._register_full_blocks(seq, full)
        return True

    def _take_free_block(self) -> int:
        if self._free:
            return heapq.heappop(self._free)
        block, _ = self._evictable.popitem(last=False)
        del self._cached[self._block_hash[block]]  # a named block is the only one under its hash
        self._block_hash[block] = None
        self.num_evictions += 1
        return block

    def _register_full_blocks(self, seq: Sequence, num_full: int) -> None:
        done = self._num_hashed.get(seq.seq_id, 0)
        hashes = self._hashes(seq, num_full)
        for i in range(done, num_full):
            block, block_hash = seq.block_table[i], hashes[i]
            if self._block_hash[block] is None and block_hash not in self._cached:
                # A duplicate (two requests computed the same prefix at once) stays unnamed: it is
                # simply freed, and the first copy keeps serving hits.
                self._block_hash[block] = block_hash
                self._cached[block_hash] = block
        self._num_hashed[seq.seq_id] = num_full

    def free(self, seq: Sequence) -> None:
        """Release the sequence's blocks; those holding a named full block stay cached until evicted."""
        for block in reversed(seq.block_table):  # the chain's tail becomes the first to be evicted
            self._ref_count[block] -= 1
            if self._ref_count[block] == 0:
                if self._block_hash[block] is not None:
                    self._evictable[block] = None
                else:
                    heapq.heappush(self._free, block)
        seq.block_table = []
        seq.num_computed_tokens = 0
        self._num_hashed.pop(seq.seq_id, None)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block that no sequence holds (vLLM's LLM.reset_prefix_cache)."""
        for block in self._evictable:
            del self._cached[self._block_hash[block]]
            self._block_hash[block] = None
            heapq.heappush(self._free, block)
        self._evictable.clear()
