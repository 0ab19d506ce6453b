"""Finished sequences -> vLLM's RequestOutput: text, stop reason, log-probabilities with token text."""

from __future__ import annotations

from dataclasses import dataclass, field

from tprun.config import SamplingParams
from tprun.engine.outputs import CompletionOutput, Logprob, RequestOutput
from tprun.engine.sequence import Sequence
from tprun.worker.step import SampleLogprobs


@dataclass
class PendingRequest:
    request_id: str
    prompt: str | None
    params: SamplingParams
    finished: list[Sequence] = field(default_factory=list)


def request_output(request: PendingRequest, tokenizer, words: TokenText) -> RequestOutput:
    seqs = sorted(request.finished, key=lambda s: s.seq_id)  # sample index order
    skip = request.params.skip_special_tokens
    outputs = []
    for index, seq in enumerate(seqs):
        if isinstance(seq.stop_reason, str):  # the checker's text is cut at the stop string
            text = seq.stop_checker.text
        else:
            text = tokenizer.decode(seq.output_token_ids, skip_special_tokens=skip)
        logprobs = None
        if seq.logprobs is not None:
            words.learn(seq.logprobs)
            logprobs = [words.position(lp) for lp in seq.logprobs]
        outputs.append(CompletionOutput(
            index=index, text=text, token_ids=list(seq.output_token_ids), finish_reason=seq.finish_reason,
            error=seq.error, stop_reason=seq.stop_reason,
            cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None, logprobs=logprobs,
        ))
    first = seqs[0]
    prompt_logprobs = None
    if request.params.prompt_logprobs is not None:  # a one-token prompt has nothing to score: [None]
        scored = first.prompt_logprobs or [None] * len(first.prompt_token_ids)
        words.learn(scored)
        prompt_logprobs = [None if lp is None else words.position(lp) for lp in scored]
    return RequestOutput(request.request_id, request.prompt, list(first.prompt_token_ids), outputs,
                         finished=True, prompt_logprobs=prompt_logprobs,
                         num_cached_tokens=getattr(first, "num_cached_tokens", 0))


class TokenText:
    """Each token's own text (vLLM's decoded_token), decoded once per token id for the engine's life: a
    job with logprobs meets the same ids over and over."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._text: dict[int, str] = {}

    def position(self, lp: SampleLogprobs) -> dict[int, Logprob]:
        out = {lp.token_id: Logprob(lp.logprob, lp.rank, self._text[lp.token_id])}
        for rank, (tok, value) in enumerate(zip(lp.top_ids, lp.top_logprobs), start=1):
            out.setdefault(tok, Logprob(value, rank, self._text[tok]))
        return out

    def learn(self, positions: list[SampleLogprobs | None]) -> None:
        """Decode, in one call, the ids of these positions not seen before."""
        new = {t for lp in positions if lp is not None for t in (lp.token_id, *lp.top_ids)} - self._text.keys()
        if new:
            ids = sorted(new)
            for t, text in zip(ids, self.tokenizer.batch_decode([[t] for t in ids])):
                self._text[t] = text
