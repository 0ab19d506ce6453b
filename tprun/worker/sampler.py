"""Token sampling: logits processors, greedy, temperature, min-p, top-k, top-p, and log-probabilities.

The whole batch is processed at once, on the device: no per-row kernels, no generator state. A request's
random draws are a pure function of its seed and how many tokens it has generated (sampling_race.py), so
it gets the same tokens on every rank, in any batch, and after being preempted or prefilled in chunks.
Log-probabilities come from the raw logits (vLLM's default), before any processor.
"""

from __future__ import annotations

import math

import torch

from tprun.worker import sampling_race
from tprun.worker.logits_processors import process_logits
from tprun.worker.step import SampleLogprobs, SamplerOutput, SeqStep, StepInput


class Sampler:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, logits: torch.Tensor, step: StepInput,
                 prompt_logits: list[torch.Tensor | None] | None = None) -> SamplerOutput:
        """logits: [len(step.seqs), vocab], identical on every rank of the TP group."""
        seqs = step.seqs
        wide = logits.dtype in (torch.float16, torch.bfloat16)
        lp_rows = [i for i, s in enumerate(seqs) if s.sample and s.sampling.logprobs is not None]
        raw = logits[self._to_device(lp_rows, torch.long)] if lp_rows else None
        masked = set(step.token_bitmask_rows)
        processed = [i for i, s in enumerate(seqs) if s.sample and _needs_processing(s, i in masked)]
        if processed:
            logits = logits.float() if wide else logits.clone()
            sub = logits[self._to_device(processed, torch.long)]
            bitmask = step.token_bitmask() if callable(step.token_bitmask) else step.token_bitmask
            logits[self._to_device(processed, torch.long)] = process_logits(sub, step, processed, self._to_device,
                                                                            bitmask)
        out = logits.argmax(dim=-1)  # exact in any dtype: the float32 upcast is only for sampling
        rows = [i for i, s in enumerate(seqs) if s.sample and not s.sampling.greedy]
        if rows:
            out[self._to_device(rows, torch.long)] = self._sample(logits, seqs, rows)
        token_ids = out.tolist()
        logprobs: list[SampleLogprobs | None] = [None] * len(seqs)
        if lp_rows:
            ks = [seqs[i].sampling.logprobs for i in lp_rows]
            chosen = [token_ids[i] for i in lp_rows]
            for i, lp in zip(lp_rows, top_logprobs(raw, chosen, ks, self._to_device)):
                logprobs[i] = lp
        prompt_lps: list[list[SampleLogprobs] | None] = [None] * len(seqs)
        for i, pl in enumerate(prompt_logits or []):
            if pl is not None:
                s = seqs[i]
                nxt = s.prompt_token_ids[s.start_pos + 1: s.start_pos + 1 + len(pl)]
                prompt_lps[i] = top_logprobs(pl[: len(nxt)], nxt, [s.sampling.prompt_logprobs] * len(nxt),
                                             self._to_device)
        return SamplerOutput(token_ids, logprobs, prompt_lps)

    def _sample(self, logits: torch.Tensor, seqs: list[SeqStep], rows: list[int]) -> torch.Tensor:
        params = [seqs[i].sampling for i in rows]
        picked = logits[self._to_device(rows, torch.long)]
        temp = self._to_device([p.temperature for p in params], torch.float32)
        top_k = [p.top_k if 0 < p.top_k < logits.shape[-1] else 0 for p in params]
        if any(p.min_p > 0.0 for p in params) or any(top_k):
            # Both cut the tempered distribution: mask its logits to -inf, then sample at temperature 1.
            picked = picked.float() / temp[:, None]
            temp = torch.ones_like(temp)
            if any(p.min_p > 0.0 for p in params):
                # min_p keeps tokens with probability >= min_p * the top one's: a cut in log space.
                cut = [math.log(p.min_p) if p.min_p > 0.0 else float("-inf") for p in params]
                floor = picked.max(dim=-1, keepdim=True).values + self._to_device(cut, picked.dtype)[:, None]
                picked = picked.masked_fill(picked < floor, float("-inf"))
            if any(top_k):
                # The k-th largest logit of each row is its cut (rows without top-k keep everything).
                kth = picked.topk(max(top_k), dim=-1).values
                k = self._to_device(top_k, torch.long)
                cut = torch.where(k > 0, kth.gather(1, (k - 1).clamp(min=0)[:, None])[:, 0], float("-inf"))
                picked = picked.masked_fill(picked < cut[:, None], float("-inf"))
        top_p = [p.top_p for p in params]
        return sampling_race.sample(
            picked, temp, self._to_device(top_p, torch.float32) if min(top_p) < 1.0 else None,
            [p.seed for p in params], [len(seqs[i].output_token_ids) for i in rows], self._to_device)

    def _to_device(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        if self.device.type != "cuda":
            return torch.tensor(values, dtype=dtype)
        return torch.tensor(values, dtype=dtype, pin_memory=True).to(self.device, non_blocking=True)


def _needs_processing(s: SeqStep, masked: bool) -> bool:
    p = s.sampling
    return p.needs_history or bool(p.logit_bias) or p.allowed_token_ids is not None or masked


def top_logprobs(logits: torch.Tensor, chosen: list[int], ks: list[int], to_device) -> list[SampleLogprobs]:
    """Per row: the chosen token's log-probability and rank, and the top-k (k per row). log p = logit -
    logsumexp, so the vocabulary is read a few times and no log_softmax copy is made."""
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    k = max(ks)
    lse = torch.logsumexp(x, dim=-1)
    chosen_logit = x.gather(1, to_device(chosen, torch.long)[:, None])[:, 0]
    ranks = ((x > chosen_logit[:, None]).sum(-1) + 1).tolist()
    chosen_lp = (chosen_logit - lse).tolist()
    if k > 0:
        top = x.topk(k, dim=-1)
        top_v, top_i = (top.values - lse[:, None]).tolist(), top.indices.tolist()
    else:
        top_v = top_i = [[] for _ in chosen]
    return [SampleLogprobs(t, lp, r, ti if kk == k else ti[:kk], tv if kk == k else tv[:kk])
            for t, lp, r, ti, tv, kk in zip(chosen, chosen_lp, ranks, top_i, top_v, ks)]
