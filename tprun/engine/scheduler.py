"""Deterministic continuous batching: FCFS prefill, then decode; preempt the newest by recompute.

Every decision depends only on the sequence of add/schedule/postprocess calls, never on timing or
memory measured at run time, so all ranks of a TP group make the same decisions without talking.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from tprun.engine.block_manager import BlockManager
from tprun.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    is_prefill: bool
    num_new_tokens: list[int]  # per sequence: tokens whose K/V this step computes


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, vocab_size: int | None = None) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0
        # Refused when added, or failed while scheduling: the engine reports them from its next step.
        self.finished_early: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        problem = self._reject_reason(seq)
        if problem:
            seq.finish("error", problem)
            self.finished_early.append(seq)
            return
        self.waiting.append(seq)

    def _reject_reason(self, seq: Sequence) -> str | None:
        n = seq.num_prompt_tokens
        if n == 0:
            return "the prompt is empty (0 tokens); give at least one token"
        if self.vocab_size is not None and (bad := [t for t in seq.prompt_token_ids
                                                    if not 0 <= t < self.vocab_size]):
            # At TP > 1 an out-of-range id would silently embed as zeros: refuse it here.
            return f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})"
        if n >= self.max_model_len:
            return (f"the prompt has {n} tokens but the model allows at most {self.max_model_len} "
                    f"(prompt plus at least one generated token); shorten the prompt")
        blocks = seq.num_blocks_needed(self.block_manager.block_size)
        if blocks > self.block_manager.num_blocks:
            return (f"the prompt needs {blocks} KV-cache blocks but the cache has only "
                    f"{self.block_manager.num_blocks}; give the KV cache more memory")
        return None

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.finished_early)

    def schedule(self) -> ScheduledBatch | None:
        return self._schedule_prefill() or self._schedule_decode()

    def _schedule_prefill(self) -> ScheduledBatch | None:
        seqs, counts, budget = [], [], self.max_num_batched_tokens
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = seq.num_tokens - seq.num_cached_tokens
            if (seqs and n > budget) or not self.block_manager.can_allocate(seq, n):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq, n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            seqs.append(seq)
            counts.append(n)
            budget -= n
        return ScheduledBatch(seqs, True, counts) if seqs else None

    def _schedule_decode(self) -> ScheduledBatch | None:
        scheduled: list[Sequence] = []
        while self.running and len(scheduled) < self.max_num_seqs:
            seq = self.running.popleft()
            while not self.block_manager.can_allocate(seq, 1):
                if self.running:
                    self._preempt(self.running.pop())
                elif scheduled:
                    self._preempt(seq)
                    break
                else:
                    self._fail_alone(seq)
                    break
            else:
                self.block_manager.allocate(seq, 1)
                scheduled.append(seq)
        self.running.extendleft(reversed(scheduled))
        return ScheduledBatch(scheduled, False, [1] * len(scheduled)) if scheduled else None

    def _fail_alone(self, seq: Sequence) -> None:
        # It holds the whole cache and still cannot grow: preempting it would loop forever.
        self.block_manager.free(seq)
        seq.finish("error", f"the KV cache ({self.block_manager.num_blocks} blocks of "
                   f"{self.block_manager.block_size} tokens) cannot hold {seq.num_tokens + 1} tokens; "
                   "give the KV cache more memory or lower max_tokens")
        self.finished_early.append(seq)

    def _preempt(self, seq: Sequence) -> None:
        # Recompute, not swap: the sequence returns to the head of the queue and is prefilled again
        # with its prompt and everything generated so far.
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.block_manager.free(seq)
        self.waiting.appendleft(seq)

    def postprocess(self, batch: ScheduledBatch, token_ids: list[int]) -> list[Sequence]:
        finished = []
        for seq, n, token in zip(batch.seqs, batch.num_new_tokens, token_ids):
            seq.num_cached_tokens += n
            seq.append_token(token)
            seq.check_stop(self.max_model_len)
            if seq.is_finished:
                self.block_manager.free(seq)
                self.running.remove(seq)
                finished.append(seq)
        return finished
