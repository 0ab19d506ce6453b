"""The scheduler's decisions are a pure function of its inputs, and it never loses a request."""

from __future__ import annotations

import random
import zlib

import pytest

from tprun.engine.block_manager import BlockManager
from tprun.engine.scheduler import Scheduler
from tprun.engine.sequence import Sequence
from tprun.worker.step import SamplerOutput, SamplingOptions


def _seq(i: int, n_prompt: int, max_tokens: int) -> Sequence:
    opts = SamplingOptions(0.0, 1.0, -1, max_tokens, 0, frozenset(), True)
    return Sequence(i, list(range(1, n_prompt + 1)), opts, frozenset())


def _step_done(sched: Scheduler, batch, out: SamplerOutput) -> list:
    """A step run without scheduling ahead: launched (commit), then its output arrives (resolve)."""
    sched.commit(batch)
    return sched.resolve(batch, out)


def _sampled(token_ids: list[int]) -> SamplerOutput:
    return SamplerOutput(token_ids, [None] * len(token_ids), [None] * len(token_ids))


def _drive(num_blocks: int, block_size: int, specs: list[tuple[int, int]], token_fn, budget: int = 64,
           caching: bool = True) -> tuple[list, Scheduler, list[Sequence]]:
    sched = Scheduler(BlockManager(num_blocks, block_size, caching), max_num_seqs=8, max_num_batched_tokens=budget,
                      max_model_len=128)
    seqs = [_seq(i, p, m) for i, (p, m) in enumerate(specs)]
    for s in seqs:
        sched.add(s)
    trace = []
    for _ in range(10_000):
        if not sched.has_unfinished():
            break
        batch = sched.schedule()
        if batch is None:
            assert sched.finished_early, "no progress with requests pending"
            sched.finished_early.clear()
            continue
        assert sum(batch.num_new_tokens) <= budget
        trace.append((batch.is_prefill, [s.seq_id for s in batch.seqs], list(batch.num_new_tokens),
                      [list(s.block_table) for s in batch.seqs]))
        _step_done(sched, batch, _sampled([token_fn(s) for s in batch.seqs]))
        held = {b for s in sched.running for b in s.block_table}  # blocks may be shared
        assert len(held) + sched.block_manager.num_free_blocks == num_blocks, "blocks leaked"
    return trace, sched, seqs


def test_small_cache_preempts_and_every_request_still_gets_all_its_tokens():
    specs = [(random.Random(i).randrange(3, 20), 10) for i in range(8)]
    _trace, sched, seqs = _drive(12, 4, specs, lambda s: s.num_tokens % 50)
    assert sched.num_preemptions > 0
    for s, (_, m) in zip(seqs, specs):
        assert s.finish_reason == "length" and len(s.output_token_ids) == m


def test_same_inputs_give_the_same_schedule():
    specs = [(random.Random(i).randrange(3, 20), 7) for i in range(8)]
    a = _drive(12, 4, specs, lambda s: s.num_tokens)[0]
    b = _drive(12, 4, specs, lambda s: s.num_tokens)[0]
    assert a == b


def test_prompt_longer_than_model_or_cache_fails_alone():
    sched = Scheduler(BlockManager(4, 4), max_num_seqs=8, max_num_batched_tokens=64, max_model_len=32)
    too_long, too_big, empty, fine = _seq(0, 40, 4), _seq(1, 20, 4), _seq(2, 0, 4), _seq(3, 5, 2)
    for s in (too_long, too_big, empty, fine):
        sched.add(s)
    assert too_long.finish_reason == "error" and "at most 32" in too_long.error
    assert too_big.finish_reason == "error" and "KV-cache blocks" in too_big.error
    assert empty.finish_reason == "error" and "empty" in empty.error
    assert list(sched.waiting) == [fine]
    assert sched.finished_early == [too_long, too_big, empty], "refused requests are reported, in order"


def test_token_id_outside_the_vocabulary_is_refused():
    sched = Scheduler(BlockManager(4, 4), max_num_seqs=8, max_num_batched_tokens=64, max_model_len=32,
                      vocab_size=100)
    seq = _seq(0, 3, 2)
    seq.prompt_token_ids[1] = 100
    sched.add(seq)
    assert seq.finish_reason == "error" and "prompt token id 100 is outside the vocabulary [0, 100)" in seq.error
    assert not sched.waiting and sched.finished_early == [seq]


def test_request_that_outgrows_the_whole_cache_ends_with_an_error_instead_of_looping():
    _trace, _sched, seqs = _drive(2, 4, [(6, 50)], lambda s: 1)
    assert seqs[0].finish_reason == "error" and "cannot hold" in seqs[0].error


def _context_model(s: Sequence) -> int:
    """A stand-in for greedy decoding: the next token is a pure function of the whole context."""
    return zlib.crc32(repr(s.token_ids).encode()) % 50 + 1


def _outputs(seqs: list[Sequence]) -> list[list[int]]:
    return [s.output_token_ids for s in seqs]


def test_chunked_prefill_keeps_the_budget_and_decodes_never_wait_for_a_prompt():
    specs = [(40, 6), (3, 9), (33, 6), (5, 8), (17, 6)]
    trace, _sched, seqs = _drive(64, 4, specs, _context_model, budget=16)
    steps_of = {i: [k for k, step in enumerate(trace) if i in step[1]] for i in range(len(specs))}
    assert len(steps_of[0]) >= 40 // 16 + 6, "the 40-token prompt is split over steps"
    for i, (_prompt, max_tokens) in enumerate(specs):
        # Once a request has its first token it decodes in every step until it ends.
        first = steps_of[i][-max_tokens]
        assert steps_of[i][-max_tokens:] == list(range(first, first + max_tokens))
    unchunked = _drive(64, 4, specs, _context_model, budget=128, caching=False)[2]
    assert _outputs(seqs) == _outputs(unchunked)


def test_only_the_last_chunk_of_a_prompt_keeps_its_token():
    sched = Scheduler(BlockManager(32, 4), max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64)
    seq = _seq(0, 40, 2)
    sched.add(seq)
    chunks = []
    while not seq.is_finished:
        batch = sched.schedule()
        chunks.append((batch.num_new_tokens[0], batch.sample[0]))
        _step_done(sched, batch, _sampled([7]))
    assert chunks == [(16, False), (16, False), (8, True), (1, True)]
    assert seq.output_token_ids == [7, 7]


def test_requests_sharing_a_prefix_reuse_its_full_blocks_in_the_same_step():
    sched = Scheduler(BlockManager(32, 4), max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64)
    seqs = [_seq(0, 20, 2), _seq(1, 20, 2), _seq(2, 9, 2), _seq(3, 3, 2)]
    for s in seqs:
        sched.add(s)
    batch = sched.schedule()
    # The same 20 tokens: 4 of the 5 full blocks (the last token is always recomputed, for its logits);
    # 9 tokens: 2 blocks; 3 tokens: no full block.
    assert [s.num_cached_tokens for s in seqs] == [0, 16, 8, 0]
    assert batch.num_new_tokens == [20, 4, 1, 3]
    assert seqs[1].block_table[:4] == seqs[0].block_table[:4] == seqs[2].block_table[:2] + seqs[0].block_table[2:4]
    assert sched.num_cached_prompt_tokens == 24


@pytest.mark.parametrize("budget", [16, 64])
def test_caching_and_chunking_change_the_work_but_not_the_tokens(budget):
    # Prompts 1..n share prefixes of every length; the small cache forces preemption and eviction.
    specs = [(random.Random(i).randrange(3, 30), 10) for i in range(10)]
    base_trace, _, base = _drive(16, 4, specs, _context_model, budget=128, caching=False)
    trace, sched, seqs = _drive(16, 4, specs, _context_model, budget=budget)
    assert sched.num_preemptions > 0 and sched.block_manager.num_evictions > 0
    assert _outputs(seqs) == _outputs(base)
    assert sum(map(sum, (t[2] for t in trace))) < sum(map(sum, (t[2] for t in base_trace)))
    assert trace == _drive(16, 4, specs, _context_model, budget=budget)[0], "same inputs, same schedule"
