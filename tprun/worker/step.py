"""What the engine hands the worker for one step: plain data, no engine objects."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingOptions:
    """The engine's plain copy of SamplingParams (pydantic stays at the edge), token ids resolved."""

    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    seed: int
    stop_token_ids: frozenset[int]
    ignore_eos: bool
    min_p: float = 0.0
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    allowed_token_ids: tuple[int, ...] | None = None
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # Tokens min_tokens holds back: stop_token_ids and, unless ignore_eos, the model's EOS ids.
    min_tokens_blocked: frozenset[int] = frozenset()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def needs_history(self) -> bool:
        """Whether sampling reads the sequence's earlier tokens (penalties, bad words, min_tokens)."""
        return self.has_penalties or bool(self.bad_words_ids) or self.min_tokens > 0


@dataclass(frozen=True)
class SeqStep:
    seq_id: int
    new_token_ids: list[int]  # tokens whose K/V this step computes
    start_pos: int  # position of new_token_ids[0] (= tokens already cached)
    block_table: list[int]
    sampling: SamplingOptions
    # The sequence's own lists (not copies): read during this step only, for penalties, bad words,
    # min_tokens and prompt logprobs. Same process, so passing them costs nothing.
    prompt_token_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)
    # False for a prompt chunk that does not reach the end of the prompt: no token is sampled for it
    # (and no noise drawn, so its generator stays where the unchunked schedule would have it).
    sample: bool = True
    # Tokens generated before the one this step samples (the counter of its seeded noise); may exceed
    # len(output_token_ids) when the last sampled token has not reached the host yet.
    num_generated: int = 0
    # Scheduling ahead: when >= 0, this sequence's last new token is the one the previous step sampled
    # in that row; it is read on the device (new_token_ids holds a placeholder for it).
    prev_row: int = -1

    @property
    def seq_len(self) -> int:
        return self.start_pos + len(self.new_token_ids)

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.sampling.prompt_logprobs is not None and self.start_pos < len(self.prompt_token_ids)


@dataclass(frozen=True)
class StepInput:
    seqs: list[SeqStep]
    is_prefill: bool
    # Structured output: packed allowed-token bitmask (int32, bit j of word i = token 32*i+j) for the
    # rows in token_bitmask_rows, computed by the engine on every rank from the same grammar state; or a
    # function returning it, called after the forward pass is launched (the host fills while the GPU runs).
    token_bitmask: torch.Tensor | Callable[[], torch.Tensor] | None = None
    token_bitmask_rows: list[int] = field(default_factory=list)


@dataclass(slots=True)
class SampleLogprobs:
    """Top-k log-probabilities of one sampled position (raw model distribution)."""

    token_id: int
    logprob: float
    rank: int
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[SampleLogprobs | None]  # per row; None where the request did not ask
    # per row: for each prompt position this step covered (from start_pos), the logprobs of the token at
    # the NEXT position (the first prompt token is never predicted); None where not asked.
    prompt_logprobs: list[list[SampleLogprobs] | None]
