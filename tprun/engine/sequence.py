"""One request as the scheduler sees it: token ids, KV blocks, status."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from tprun.worker.step import SamplingOptions, SeqStep


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
    num_cached_tokens: int = 0  # tokens whose K/V are already in the cache
    finish_reason: str | None = None
    error: str | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def num_blocks_needed(self, block_size: int) -> int:
        return (self.num_tokens + block_size - 1) // block_size

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)

    def check_stop(self, max_model_len: int) -> None:
        last = self.output_token_ids[-1]
        s = self.sampling
        if last in s.stop_token_ids or (not s.ignore_eos and last in self.eos_token_ids):
            self.finish("stop")
        elif len(self.output_token_ids) >= s.max_tokens or self.num_tokens >= max_model_len:
            self.finish("length")

    def step_input(self, num_new_tokens: int) -> SeqStep:
        start = self.num_tokens - num_new_tokens
        # A decode step needs only the last output token: slicing token_ids would copy the whole context.
        p = self.num_prompt_tokens
        new = self.output_token_ids[start - p :] if start >= p else self.token_ids[start:]
        return SeqStep(self.seq_id, new, start, list(self.block_table), self.sampling)

    def finish(self, reason: str, error: str | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.error = error
