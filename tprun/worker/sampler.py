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
from tprun.worker.sampled_step import SampledStep
from tprun.worker.step import SampleLogprobs, SamplerOutput, SeqStep, StepInput


class Sampler:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, logits: torch.Tensor, step: StepInput,
                 prompt_logits: list[torch.Tensor | None] | None = None) -> SampledStep:
        """logits: [len(step.seqs), vocab], identical on every rank of the TP group. Nothing here waits
        for the device: the tokens stay there for the next step, the host gets them from result()."""
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
        rows = [i for i, s in enumerate(seqs) if s.sample and not s.sampling.greedy]
        if len(rows) == len(seqs):  # every row samples: no argmax to overwrite
            out = self._sample(logits, seqs, rows)
        else:
            out = logits.argmax(dim=-1)  # exact in any dtype: the float32 upcast is only for sampling
            if rows:
                out[self._to_device(rows, torch.long)] = self._sample(logits, seqs, rows)
        tensors = [out]
        if lp_rows:
            k = max(seqs[i].sampling.logprobs for i in lp_rows)
            tensors += logprob_tensors(raw, out[self._to_device(lp_rows, torch.long)], k)
        prompt_rows = []
        for i, pl in enumerate(prompt_logits or []):
            if pl is not None:
                s = seqs[i]
                nxt = s.prompt_token_ids[s.start_pos + 1: s.start_pos + 1 + len(pl)]
                prompt_rows.append((i, nxt))
                tensors += logprob_tensors(pl[: len(nxt)], self._to_device(nxt, torch.long), s.sampling.prompt_logprobs)

        def build(host: list[list]) -> SamplerOutput:
            token_ids, parts = host[0], iter(host[1:])
            logprobs: list[SampleLogprobs | None] = [None] * len(seqs)
            if lp_rows:
                chosen = [token_ids[i] for i in lp_rows]
                ks = [seqs[i].sampling.logprobs for i in lp_rows]
                for i, lp in zip(lp_rows, logprob_records(chosen, ks, *(next(parts) for _ in range(4)))):
                    logprobs[i] = lp
            prompt_lps: list[list[SampleLogprobs] | None] = [None] * len(seqs)
            for i, nxt in prompt_rows:
                ks = [seqs[i].sampling.prompt_logprobs] * len(nxt)
                prompt_lps[i] = logprob_records(nxt, ks, *(next(parts) for _ in range(4)))
            return SamplerOutput(token_ids, logprobs, prompt_lps)

        return SampledStep(out, tensors, build)

    def _sample(self, logits: torch.Tensor, seqs: list[SeqStep], rows: list[int]) -> torch.Tensor:
        params = [seqs[i].sampling for i in rows]
        # Every row sampling (the common case) reads the logits in place: no copy of [rows, vocab].
        picked = logits if len(rows) == logits.shape[0] else logits[self._to_device(rows, torch.long)]
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
            [p.seed for p in params], [seqs[i].num_generated for i in rows], self._to_device)

    def _to_device(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        if self.device.type != "cuda":
            return torch.tensor(values, dtype=dtype)
        return torch.tensor(values, dtype=dtype, pin_memory=True).to(self.device, non_blocking=True)


def _needs_processing(s: SeqStep, masked: bool) -> bool:
    p = s.sampling
    return p.needs_history or bool(p.logit_bias) or p.allowed_token_ids is not None or masked


def logprob_tensors(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> list[torch.Tensor]:
    """Per row, on the device: the chosen token's log-probability and rank, and the top-k values and ids.
    log p = logit - logsumexp, so the vocabulary is read a few times and no log_softmax copy is made."""
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    lse = torch.logsumexp(x, dim=-1)
    chosen_logit = x.gather(1, chosen[:, None])[:, 0]
    ranks = (x > chosen_logit[:, None]).sum(-1) + 1
    top = x.topk(k, dim=-1)
    return [chosen_logit - lse, ranks, top.values - lse[:, None], top.indices]


def logprob_records(chosen: list[int], ks: list[int], chosen_lp: list[float], ranks: list[int],
                    top_v: list[list[float]], top_i: list[list[int]]) -> list[SampleLogprobs]:
    """The host's records from logprob_tensors' lists (each row keeps its own k of the batch's widest)."""
    return [SampleLogprobs(t, lp, r, ti[:kk], tv[:kk])
            for t, lp, r, ti, tv, kk in zip(chosen, chosen_lp, ranks, top_i, top_v, ks)]
