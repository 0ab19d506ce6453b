"""One request as the scheduler sees it: token ids, KV blocks, status."""

from __future__ import annotations

import enum
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from tprun.engine.stop_strings import StopStringChecker
from tprun.worker.step import SampleLogprobs, SamplingOptions, SeqStep


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    seq_id: int  # arrival order: FCFS and preemption order both derive from it, so every rank agrees
    prompt_token_ids: list[int]
    sampling: SamplingOptions
    eos_token_ids: frozenset[int]
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache (vLLM's name): a prefill may take steps
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache when first scheduled (vLLM's)
    num_preemptions: int = 0
    # Scheduling ahead: tokens sampled on the device whose values the host has not received yet. They
    # count as tokens (the next step computes their K/V) but are not in output_token_ids until resolved.
    num_pending: int = 0
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of its full blocks
    finish_reason: str | None = None
    error: str | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string matched (vLLM's)
    stop_checker: StopStringChecker | None = None
    matcher: Any = None  # structured output: the grammar state after the tokens generated so far
    grammar: Future | None = None  # structured output: the compile, resolved before first scheduling
    grammar_accepted: bool = True  # whether the grammar took the last sampled token
    logprobs: list[SampleLogprobs] | None = None
    cumulative_logprob: float = 0.0
    prompt_logprobs: list[SampleLogprobs | None] | None = None  # index p: logprobs of prompt token p

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending

    @property
    def num_known_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_generated(self) -> int:
        """Tokens sampled so far, pending ones included."""
        return len(self.output_token_ids) + self.num_pending

    def will_finish_by_length(self, max_model_len: int) -> bool:
        """Its pending token is its last one (max_tokens or the model's length): no step needs it again."""
        return self.num_pending > 0 and (self.num_generated >= self.sampling.max_tokens
                                         or self.num_tokens >= max_model_len)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def num_blocks_needed(self, block_size: int) -> int:
        return (self.num_tokens + block_size - 1) // block_size

    def append_token(self, token_id: int, logprobs: SampleLogprobs | None = None) -> None:
        self.output_token_ids.append(token_id)
        if logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.append(logprobs)
            self.cumulative_logprob += logprobs.logprob

    def record_prompt_logprobs(self, start_pos: int, values: list[SampleLogprobs]) -> None:
        """values[i] scores prompt token start_pos + 1 + i; a recompute after preemption repeats them."""
        if self.prompt_logprobs is None:
            self.prompt_logprobs = [None] * self.num_prompt_tokens
        for i, v in enumerate(values):
            if self.prompt_logprobs[start_pos + 1 + i] is None:
                self.prompt_logprobs[start_pos + 1 + i] = v

    def check_stop(self, max_model_len: int) -> None:
        last = self.output_token_ids[-1]
        s = self.sampling
        n = len(self.output_token_ids)
        if self.matcher is not None:  # the engine fed the token to the grammar for the whole batch
            if not self.grammar_accepted:
                self.finish("error", f"token {last} does not fit the structured output grammar (a bug)")
                return
            if self.matcher.is_terminated():  # it took the EOS that closes the grammar (even with ignore_eos)
                self.finish("stop")
                return
        if n > s.min_tokens or s.min_tokens == 0:
            if last in s.stop_token_ids:
                self.stop_reason = last
                self.finish("stop")
                return
            if not s.ignore_eos and last in self.eos_token_ids:
                self.finish("stop")
                return
        if self.stop_checker is not None:
            matched = self.stop_checker.append(last, n)
            if matched is not None:
                self.stop_reason = matched
                self.finish("stop")
                return
        if n >= s.max_tokens or self.num_known_tokens >= max_model_len:
            self.finish("length")

    def step_input(self, num_new_tokens: int, sample: bool = True, prev_row: int = -1) -> SeqStep:
        """prev_row: the row of the previous step that sampled this sequence's pending token, which is
        then the last of the new tokens (a placeholder here, read on the device)."""
        start = self.num_computed_tokens  # a prompt chunk need not end at the last token
        # A decode step needs only the last output token: slicing token_ids would copy the whole context.
        p = self.num_prompt_tokens
        end = start + num_new_tokens
        known = min(end, self.num_known_tokens)
        new = self.output_token_ids[start - p : known - p] if start >= p else self.token_ids[start:known]
        if known < end:
            if prev_row < 0 or end - known != 1:
                raise RuntimeError(f"sequence {self.seq_id} is scheduled past its known tokens (a bug)")
            new = [*new, 0]
        else:
            prev_row = -1
        return SeqStep(self.seq_id, new, start, list(self.block_table), self.sampling,
                       self.prompt_token_ids, self.output_token_ids, sample, self.num_generated, prev_row)

    def finish(self, reason: str, error: str | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.error = error
