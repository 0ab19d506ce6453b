"""What the engine hands the worker for one step: plain data, no engine objects."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingOptions:
    """The engine's plain copy of SamplingParams (pydantic stays at the edge)."""

    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    seed: int
    stop_token_ids: frozenset[int]
    ignore_eos: bool

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class SeqStep:
    seq_id: int
    new_token_ids: list[int]  # tokens whose K/V this step computes
    start_pos: int  # position of new_token_ids[0] (= tokens already cached)
    block_table: list[int]
    sampling: SamplingOptions

    @property
    def seq_len(self) -> int:
        return self.start_pos + len(self.new_token_ids)


@dataclass(frozen=True)
class StepInput:
    seqs: list[SeqStep]
    is_prefill: bool
    finished_seq_ids: list[int]  # sequences that ended since the last step: drop their sampler state
