"""Deterministic continuous batching with chunked prefill (vLLM v1 style); preemption by recompute.

Each step has one token budget (max_num_batched_tokens): the running decodes first, one token each,
then the running sequences still prefilling, then waiting sequences, whose prompts are cut into chunks
that fit what is left. Every decision depends only on the sequence of add/schedule/commit/resolve calls,
never on timing or memory measured at run time, so all ranks of a TP group make the same decisions
without talking.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from tprun.engine.block_manager import BlockManager
from tprun.engine.sequence import Sequence, SequenceStatus
from tprun.worker.step import SamplerOutput


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    is_prefill: bool  # False: every sequence has exactly one new token (a decode-shaped step: graphs)
    num_new_tokens: list[int]  # per sequence: tokens whose K/V this step computes
    # Per sequence: does this step reach the end of its tokens, so that its sampled token is kept? False
    # for a prompt chunk that is not the last one: its row's token must be dropped (and draw no noise).
    sample: list[bool]
    # Per sequence: num_computed_tokens when the step was scheduled (set by commit()).
    starts: list[int] = field(default_factory=list)
    grammar_rows: list[int] = field(default_factory=list)  # rows sampled under a structured-output mask

    def add(self, seq: Sequence, num_new_tokens: int, sample: bool) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(num_new_tokens)
        self.sample.append(sample)
        self.is_prefill |= num_new_tokens != 1


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
        self.num_cached_prompt_tokens = 0  # summed over requests: prompt tokens served by the prefix cache
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
        batch = ScheduledBatch([], False, [], [])
        # Decodes before the chunks of prompts already started; within each, admission order.
        decodes, chunks, finishing = [], [], False
        for s in self.running:
            if s.will_finish_by_length(self.max_model_len):
                finishing = True  # scheduling ahead: its last token is on its way, nothing left to compute
                continue
            (decodes if s.num_tokens - s.num_computed_tokens == 1 else chunks).append(s)
        order = deque(decodes + chunks)
        budget = self.max_num_batched_tokens
        preempted: set[int] = set()
        waited = False
        while order and budget > 0:
            seq = order.popleft()
            left = seq.num_tokens - seq.num_computed_tokens
            n = min(left, budget)
            while not self.block_manager.allocate_slots(seq, n):
                if order:  # the lowest priority not yet scheduled makes room
                    victim = order.pop()
                elif batch.seqs:
                    victim = seq
                elif finishing or seq.num_pending:
                    # Tokens still on their way may free blocks (finishing sequences) or end this one (its own
                    # pending token may be a stop): wait a step, then fail it alone if it still cannot grow.
                    waited = True
                    break
                else:
                    self._fail_alone(seq, n)
                    preempted.add(seq.seq_id)
                    break
                self._preempt(victim)
                preempted.add(victim.seq_id)
                if victim is seq:
                    break
            else:  # batch.add, inlined: this loop runs for every decoding sequence every step
                batch.seqs.append(seq)
                batch.num_new_tokens.append(n)
                batch.sample.append(n == left)
                batch.is_prefill |= n != 1
                budget -= n
        if preempted:  # the cache just ran out for a running sequence: admitting more would thrash
            self.running = deque(s for s in self.running if s.seq_id not in preempted)
        elif not waited:
            self._admit(budget, batch)
        return batch if batch.seqs else None

    def _admit(self, budget: int, batch: ScheduledBatch) -> None:
        """Waiting sequences, first come first served, with the first chunk that fits the budget."""
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            prefix = bm.cached_prefix(seq)
            left = seq.num_tokens - len(prefix) * bm.block_size
            n = min(left, budget)
            if not bm.allocate_slots(seq, n, prefix):
                break
            self.waiting.popleft()
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = seq.num_computed_tokens
                self.num_cached_prompt_tokens += seq.num_cached_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.add(seq, n, n == left)
            budget -= n

    def _fail_alone(self, seq: Sequence, num_new_tokens: int) -> None:
        # It holds the whole cache and still cannot grow: preempting it would loop forever.
        needed = seq.num_computed_tokens + num_new_tokens
        self.block_manager.free(seq)
        seq.finish("error", f"the KV cache ({self.block_manager.num_blocks} blocks of "
                   f"{self.block_manager.block_size} tokens) cannot hold {needed} tokens; "
                   "give the KV cache more memory or lower max_tokens")
        self.finished_early.append(seq)

    def _preempt(self, seq: Sequence) -> None:
        # Recompute, not swap: the sequence returns to the head of the queue and is prefilled again
        # with its prompt and everything generated so far (its freed blocks stay in the prefix cache,
        # so it usually finds most of them again).
        self.num_preemptions += 1
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.block_manager.free(seq)
        self.waiting.appendleft(seq)

    def commit(self, batch: ScheduledBatch) -> None:
        """The step was launched: its K/V count as computed and each sampling row owes a token (pending
        until resolve() brings its value). The next step can be scheduled before that."""
        batch.starts = [seq.num_computed_tokens for seq in batch.seqs]
        for seq, n, sample in zip(batch.seqs, batch.num_new_tokens, batch.sample):
            seq.num_computed_tokens += n
            seq.num_pending += sample

    def resolve(self, batch: ScheduledBatch, out: SamplerOutput) -> list[Sequence]:
        """The step's output reached the host: append the tokens, check stops, free what finished. A
        sequence that finished at an earlier step (its stop became known after this step was launched)
        drops this step's token: a token past a stop is never returned."""
        finished = []
        for i, (seq, sample) in enumerate(zip(batch.seqs, batch.sample)):
            seq.num_pending -= sample
            if seq.is_finished:
                continue
            if out.prompt_logprobs[i] is not None:
                seq.record_prompt_logprobs(batch.starts[i], out.prompt_logprobs[i])
            if not sample:  # a prompt chunk short of the end: its row's token is not a generated one
                continue
            seq.append_token(out.token_ids[i], out.logprobs[i])
            # Preempted since this step was launched, it waits in the queue for a recompute.
            queue = self.running if seq.status is SequenceStatus.RUNNING else self.waiting
            seq.check_stop(self.max_model_len)
            if seq.is_finished:
                self.block_manager.free(seq)
                queue.remove(seq)
                finished.append(seq)
        return finished
