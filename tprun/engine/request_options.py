"""SamplingParams (the pydantic edge) -> SamplingOptions (plain data for the worker), with every token id
checked against the model's vocabulary and bad words tokenized as vLLM does."""

from __future__ import annotations

from tprun.config import SamplingParams
from tprun.worker.step import SamplingOptions


class RequestError(ValueError):
    """A request the engine refuses; the message names the field."""


def sampling_options(params: SamplingParams, seed: int, vocab_size: int, eos_token_ids: frozenset[int],
                     tokenizer) -> SamplingOptions:
    _check_vocab("stop_token_ids", params.stop_token_ids, vocab_size)
    _check_vocab("allowed_token_ids", params.allowed_token_ids or [], vocab_size)
    _check_vocab("logit_bias", list(params.logit_bias or {}), vocab_size)
    bad = bad_words_ids(params.bad_words or [], tokenizer)
    _check_vocab("bad_words", [t for w in bad for t in w], vocab_size)
    stop_ids = frozenset(params.stop_token_ids)
    return SamplingOptions(
        temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, max_tokens=params.max_tokens,
        seed=seed, stop_token_ids=stop_ids, ignore_eos=params.ignore_eos, min_p=params.min_p,
        min_tokens=params.min_tokens, presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty, repetition_penalty=params.repetition_penalty,
        logit_bias=tuple(sorted((params.logit_bias or {}).items())),
        allowed_token_ids=tuple(sorted(set(params.allowed_token_ids))) if params.allowed_token_ids else None,
        bad_words_ids=tuple(bad), logprobs=params.logprobs, prompt_logprobs=params.prompt_logprobs,
        min_tokens_blocked=stop_ids | (frozenset() if params.ignore_eos else eos_token_ids),
    )


def bad_words_ids(words: list[str], tokenizer) -> list[tuple[int, ...]]:
    """Each word as it starts a text and, where that tokenizes differently, as it follows a space (vLLM)."""
    out: list[tuple[int, ...]] = []
    for word in words:
        plain = tuple(tokenizer.encode(word.lstrip(), add_special_tokens=False))
        spaced = tuple(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
        if plain:
            out.append(plain)
        if spaced and plain and spaced[0] != plain[0] and len(spaced) == len(plain):
            out.append(spaced)
    return out


def _check_vocab(name: str, ids: list[int], vocab_size: int) -> None:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"{name} has token id {bad[0]} outside the model's vocabulary [0, {vocab_size})")
