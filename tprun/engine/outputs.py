"""vLLM-shaped results."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Logprob:
    """One token's log-probability under the raw model distribution (vLLM's default), its rank in that
    distribution (1 = most likely) and its text."""

    logprob: float
    rank: int
    decoded_token: str | None = None


# Per position: token id -> Logprob, the sampled (or prompt) token first, then the top-k by rank.
SampleLogprobs = list[dict[int, Logprob]]
PromptLogprobs = list[dict[int, Logprob] | None]  # None for the first prompt token (nothing predicts it)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "error"
    error: str | None = None
    stop_reason: int | str | None = None  # the stop string or stop token id matched; None on EOS or length
    cumulative_logprob: float | None = None  # sum of the sampled tokens' logprobs, when logprobs was asked
    logprobs: SampleLogprobs | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True
    prompt_logprobs: PromptLogprobs | None = None
    num_cached_tokens: int = 0
