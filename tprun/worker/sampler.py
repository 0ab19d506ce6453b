"""Token sampling: greedy, temperature, top-k, top-p, each request with its own seeded generator.

A request's generator is created from its seed when the request is first sampled and advances by
one draw per sampled token, so a request gets the same tokens on every rank, in any batch, and after
being preempted and recomputed.
"""

from __future__ import annotations

import torch

from tprun.worker.step import SeqStep


class Sampler:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._generators: dict[int, torch.Generator] = {}

    def _generator(self, seq: SeqStep) -> torch.Generator:
        gen = self._generators.get(seq.seq_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seq.sampling.seed)
            self._generators[seq.seq_id] = gen
        return gen

    def release(self, seq_id: int) -> None:
        self._generators.pop(seq_id, None)

    def __call__(self, logits: torch.Tensor, seqs: list[SeqStep]) -> list[int]:
        """logits: [len(seqs), vocab], identical on every rank of the TP group."""
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        out = logits.argmax(dim=-1)
        for i, seq in enumerate(seqs):
            s = seq.sampling
            if s.greedy:
                continue
            probs = _filtered_probs(logits[i] / s.temperature, s.top_k, s.top_p)
            # Exponential race (Gumbel-max): argmax(p / E) with E ~ Exp(1) is a draw from p.
            noise = torch.empty_like(probs).exponential_(generator=self._generator(seq))
            out[i] = (probs / noise).argmax()
        return out.tolist()


def _filtered_probs(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_probs.cumsum(0) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        probs = probs / probs.sum()
    return probs
