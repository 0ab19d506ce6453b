"""Token sampling: greedy, temperature, top-k, top-p, each request with its own seeded generator.

A request's generator is created from its seed when the request is first sampled and advances by
one draw per sampled token, so a request gets the same tokens on every rank, in any batch, and after
being preempted and recomputed.

The whole batch is filtered at once (no per-row kernels or host round trips); only the noise is drawn
per row, from that row's generator, because a shared generator would tie a request's tokens to its
batch-mates. The one host sync of a step is the final .tolist() the scheduler needs.
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
        out = logits.argmax(dim=-1)  # exact in any dtype: the float32 upcast is only for sampling
        rows = [i for i, seq in enumerate(seqs) if not seq.sampling.greedy]
        if not rows:
            return out.tolist()
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        params = [seqs[i].sampling for i in rows]
        picked = logits[self._to_device(rows, torch.long)]
        picked = picked / self._to_device([p.temperature for p in params], logits.dtype)[:, None]
        top_k = [p.top_k if 0 < p.top_k < logits.shape[-1] else 0 for p in params]
        top_p = [p.top_p for p in params]
        probs = _filtered_probs(picked, self._to_device(top_k, torch.long) if any(top_k) else None,
                                self._to_device(top_p, logits.dtype) if min(top_p) < 1.0 else None)
        # Exponential race (Gumbel-max): argmax(p / E) with E ~ Exp(1) is a draw from p.
        noise = torch.empty_like(probs)
        for j, i in enumerate(rows):
            noise[j].exponential_(generator=self._generator(seqs[i]))
        out[self._to_device(rows, torch.long)] = (probs / noise).argmax(dim=-1)
        return out.tolist()

    def _to_device(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        if self.device.type != "cuda":
            return torch.tensor(values, dtype=dtype)
        return torch.tensor(values, dtype=dtype, pin_memory=True).to(self.device, non_blocking=True)


def _filtered_probs(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Row-wise: keep each row's top_k logits (0: all), softmax, keep the smallest top_p mass (1: all)."""
    if top_k is not None:
        ordered = logits.sort(dim=-1, descending=True).values
        k = torch.where(top_k > 0, top_k, logits.shape[-1])
        kth = ordered.gather(1, (k - 1)[:, None])
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays); rows with
        # top_p = 1 keep everything, whatever the rounding of their cumulative sums.
        drop = (sorted_probs.cumsum(-1) - sorted_probs >= top_p[:, None]) & (top_p < 1.0)[:, None]
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs
