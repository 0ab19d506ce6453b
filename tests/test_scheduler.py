"""The scheduler's decisions are a pure function of its inputs, and it never loses a request."""

from __future__ import annotations

import random

from tprun.engine.block_manager import BlockManager
from tprun.engine.scheduler import Scheduler
from tprun.engine.sequence import Sequence
from tprun.worker.step import SamplingOptions


def _seq(i: int, n_prompt: int, max_tokens: int) -> Sequence:
    opts = SamplingOptions(0.0, 1.0, -1, max_tokens, 0, frozenset(), True)
    return Sequence(i, list(range(1, n_prompt + 1)), opts, frozenset())


def _drive(num_blocks: int, block_size: int, specs: list[tuple[int, int]], token_fn) -> tuple[list, Scheduler]:
    sched = Scheduler(BlockManager(num_blocks, block_size), max_num_seqs=8, max_num_batched_tokens=64,
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
        trace.append((batch.is_prefill, [s.seq_id for s in batch.seqs], list(batch.num_new_tokens)))
        sched.postprocess(batch, [token_fn(s) for s in batch.seqs])
        used = sum(len(s.block_table) for s in sched.running)
        assert used + sched.block_manager.num_free_blocks == num_blocks, "blocks leaked"
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
