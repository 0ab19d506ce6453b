"""Automatic prefix caching: chained block hashes, shared blocks with reference counts, LRU eviction."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

from tests.procs import ROOT
from tprun.engine.block_manager import BlockManager, hash_block
from tprun.engine.sequence import Sequence
from tprun.worker.step import SamplingOptions

BS = 4


def _seq(i: int, tokens: list[int], prompt_logprobs: int | None = None) -> Sequence:
    opts = SamplingOptions(0.0, 1.0, -1, 8, 0, frozenset(), True, prompt_logprobs=prompt_logprobs)
    return Sequence(i, list(tokens), opts, frozenset())


def _admit(bm: BlockManager, seq: Sequence) -> list[int]:
    """What the scheduler does for a waiting sequence with room for its whole prompt."""
    prefix = bm.cached_prefix(seq)
    n = seq.num_tokens - len(prefix) * bm.block_size
    assert bm.allocate_slots(seq, n, prefix)
    return prefix


def test_block_hash_names_the_whole_prefix_and_is_stable_across_processes():
    a = hash_block(hash_block(b"", [1, 2, 3, 4]), [5, 6, 7, 8])
    b = hash_block(hash_block(b"", [1, 2, 3, 9]), [5, 6, 7, 8])
    assert a != b, "equal blocks after different prefixes must differ"
    assert hash_block(b"", [1, 2]) != hash_block(b"", [2, 1])
    assert hash_block(b"", [1 << 40]) != hash_block(b"", [0])
    # Python's hash() is salted per process: a rank must get the same names as every other rank.
    code = ("from tprun.engine.block_manager import hash_block;"
            "print(hash_block(hash_block(b'', [1, 2, 3, 4]), [5, 6, 7, 8]).hex())")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == a.hex()
    assert len(a) == hashlib.blake2b(digest_size=16).digest_size


def test_shared_prefix_blocks_are_reused_and_reference_counted():
    bm = BlockManager(16, BS)
    first = _seq(0, list(range(10, 30)))  # 20 tokens: 5 full blocks
    assert _admit(bm, first) == []
    second = _seq(1, list(range(10, 26)) + [99, 98])  # shares 4 blocks, then differs
    assert _admit(bm, second) == first.block_table[:4]
    assert second.num_computed_tokens == 16
    assert second.block_table[4] not in first.block_table
    assert bm.num_free_blocks == 16 - 6
    first_blocks = list(first.block_table)
    bm.free(first)
    # Its 4 shared blocks are still held by `second`; only its own last block became free (cached).
    assert bm.num_free_blocks == 16 - 5
    third = _seq(2, list(range(10, 30)) + [77])
    assert _admit(bm, third) == first_blocks[:5], "the block only `first` held is found again too"
    assert bm.num_free_blocks == 16 - 7


def test_a_fully_cached_prompt_still_recomputes_its_last_block():
    bm = BlockManager(16, BS)
    tokens = list(range(10, 18))  # exactly 2 full blocks
    a, b = _seq(0, tokens), _seq(1, tokens)
    _admit(bm, a)
    assert _admit(bm, b) == a.block_table[:1], "the last token needs logits: its block is computed again"
    assert b.block_table[1] != a.block_table[1], "never write into a block another sequence reads"


def test_free_cached_blocks_are_evicted_least_recently_freed_first_tail_first():
    bm = BlockManager(6, BS)
    old, new = _seq(0, list(range(100, 109))), _seq(1, list(range(200, 209)))  # 3 blocks each, 2 full
    _admit(bm, old)
    _admit(bm, new)
    old_blocks, new_blocks = list(old.block_table), list(new.block_table)
    bm.free(old)
    bm.free(new)
    assert bm.num_free_blocks == 6
    # The partial (unnamed) blocks go first, lowest id first; then the LRU order of named blocks.
    grab = _seq(2, list(range(300, 315)))  # 4 blocks, no hit
    _admit(bm, grab)
    assert grab.block_table == sorted([old_blocks[2], new_blocks[2]]) + [old_blocks[1], old_blocks[0]]
    assert bm.num_evictions == 2
    # `old` lost its blocks; `new`'s prefix still hits.
    assert bm.cached_prefix(_seq(3, list(range(100, 109)))) == []
    assert bm.cached_prefix(_seq(4, list(range(200, 209)))) == new_blocks[:2]


def test_a_hit_on_a_free_cached_block_takes_it_out_of_the_free_pool():
    bm = BlockManager(3, BS)
    a = _seq(0, list(range(10, 19)))  # 3 blocks, 2 full
    _admit(bm, a)
    a_blocks = list(a.block_table)
    bm.free(a)
    b = _seq(1, list(range(10, 19)))
    prefix = bm.cached_prefix(b)
    assert prefix == a_blocks[:2]
    assert not bm.allocate_slots(b, 5, prefix), "2 new blocks + the 2 it reclaims: more than the cache"
    assert b.block_table == [] and b.num_computed_tokens == 0 and bm.num_free_blocks == 3
    # 1 new block for the last token plus the 2 it reclaims: exactly the cache.
    assert bm.allocate_slots(b, 1, prefix)
    assert sorted(b.block_table) == [0, 1, 2] and bm.num_free_blocks == 0


def test_prompt_logprobs_requests_never_read_the_cache_but_fill_it():
    bm = BlockManager(16, BS)
    tokens = list(range(10, 30))
    wants = _seq(0, tokens, prompt_logprobs=1)
    _admit(bm, _seq(1, tokens))
    assert _admit(bm, wants) == []
    bm2 = BlockManager(16, BS)
    _admit(bm2, _seq(0, tokens, prompt_logprobs=1))
    assert len(bm2.cached_prefix(_seq(1, tokens))) == 4


def test_caching_off_hands_out_lowest_ids_and_never_hits():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    a, b = _seq(0, list(range(10, 19))), _seq(1, list(range(10, 19)))
    _admit(bm, a)
    assert _admit(bm, b) == [] and b.block_table == [3, 4, 5]
    bm.free(a)
    c = _seq(2, list(range(10, 19)))
    assert _admit(bm, c) == [] and c.block_table == [0, 1, 2]


def test_the_same_calls_give_the_same_tables_and_cache():
    import random

    def run() -> list:
        rng = random.Random(5)
        bm = BlockManager(24, BS)
        live, tables = [], []
        for i in range(200):
            if live and (rng.random() < 0.4 or bm.num_free_blocks < 8):
                bm.free(live.pop(rng.randrange(len(live))))
                continue
            seq = _seq(i, [rng.randrange(3) for _ in range(rng.randrange(1, 20))])
            prefix = bm.cached_prefix(seq)
            n = seq.num_tokens - len(prefix) * BS
            if bm.allocate_slots(seq, n, prefix):
                live.append(seq)
                tables.append(list(seq.block_table))
        return tables + [bm.num_evictions, sorted(bm._cached.values())]

    first = run()
    assert first == run()
    assert first[-2] > 0, "the run was meant to evict"


def test_reset_forgets_free_cached_blocks_but_not_held_ones():
    bm = BlockManager(8, BS)
    held, freed = _seq(0, list(range(10, 19))), _seq(1, list(range(50, 59)))
    _admit(bm, held)
    _admit(bm, freed)
    bm.free(freed)
    bm.reset_prefix_cache()
    assert bm.cached_prefix(_seq(2, list(range(50, 59)))) == []
    assert bm.cached_prefix(_seq(3, list(range(10, 19)))) == held.block_table[:2]
    assert bm.num_free_blocks == 5
