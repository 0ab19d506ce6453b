"""Seeded sampling for a whole batch at once: an exponential race with counter-based noise, and exact
top-p by rejection instead of a sort.

Noise. Token t of a row gets E = -log(u), u uniform from a hash of (row key, t); the row key hashes the
request's seed, how many tokens it has generated, and the round below. The noise is thus a pure function of
the request and its position: the same on every rank, in any batch, after preemption or chunked prefill,
and it needs no generator state and no per-row kernel. argmax(p / E) is a draw from p (the exponential race,
equivalent to Gumbel-max).

Top-p without sorting the vocabulary. Draw from p restricted to tokens above a pivot (at first, all).
The draw s is in the top-p set exactly when the mass of tokens more likely than s is below top_p; if it is
not, no token at most as likely as s is either, so the next round draws above s. "More likely" compares
logits as they are stored, never recomputed probabilities, so rounding cannot make a token look more
likely than itself. Conditioned on
acceptance, the draw follows p renormalised on the top-p set, which is what sorting and truncating gives.
A rejection needs the tail beyond top_p to be hit, so one or two rounds almost always suffice. Rounds end on
a host check of the whole batch, which every rank makes on identical values.

Probabilities are never materialised: p = exp(logit / T - M) / Z from each row's max M and sum Z. On CUDA
each pass (stats, race, mass above a token) is one Triton kernel reading the logits once; elsewhere the
same integer hash and formulas run in torch, so the two paths draw the same tokens up to rounding.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
MASK64 = (1 << 64) - 1
_MAX_ROUNDS = 64


def row_key(seed: int, counter: int, round_: int) -> int:
    """splitmix64 of the request's seed, its generated-token count and the rejection round, to 32 bits."""
    x = (seed * 0x9E3779B97F4A7C15 + counter * 0xD1B54A32D192ED03 + round_ * 0x8CB92BA72F3D8DD7 + 1) & MASK64
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & MASK64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & MASK64
    x ^= x >> 31
    return x & MASK32


def uniform(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """keys int64 [R] (uint32 values) -> float32 [R, vocab] in (0, 1). int64 products wrap; the low 32 bits
    (all that is kept) are exact."""
    idx = torch.arange(vocab, dtype=torch.int64, device=keys.device)
    h = (idx[None, :] * 0x9E3779B1 + keys[:, None]) & MASK32
    h ^= h >> 16
    h = (h * 0x7FEB352D) & MASK32
    h ^= h >> 15
    h = (h * 0x846CA68B) & MASK32
    h ^= h >> 16
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / 16777216.0)


class TorchPasses:
    """The three passes over [R, V] logits, in torch (any device). Pivots are logits: a token takes part
    when its stored logit is above the row's pivot."""

    def __init__(self, logits: torch.Tensor, temp: torch.Tensor) -> None:
        self.logits = logits
        self.p = torch.softmax(logits.float() / temp[:, None], dim=-1)

    def race(self, keys: torch.Tensor, pivot: torch.Tensor) -> torch.Tensor:
        noise = -torch.log(uniform(keys, self.p.shape[-1]))
        score = torch.where(self.logits > pivot[:, None], self.p / noise, torch.full_like(noise, -1.0))
        return score.argmax(dim=-1)

    def logit_of(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.logits.gather(1, tokens[:, None])[:, 0]

    def mass_above(self, logit: torch.Tensor) -> torch.Tensor:
        return torch.where(self.logits > logit[:, None], self.p, torch.zeros_like(self.p)).sum(-1)


def sample(logits: torch.Tensor, temp: torch.Tensor, top_p: torch.Tensor | None, seeds: list[int],
           counters: list[int], to_device) -> torch.Tensor:
    """One token per row from softmax(logits / temp) (top-k and min-p already masked to -inf), restricted
    to each row's top-p set (top_p None: no row restricts)."""
    if logits.is_cuda:
        from tprun.worker.sampling_race_cuda import TritonPasses as Passes
    else:
        Passes = TorchPasses
    passes = Passes(logits, temp)
    rows = logits.shape[0]
    pivot = torch.full((rows,), float("-inf"), dtype=logits.dtype, device=logits.device)
    tokens = passes.race(to_device([row_key(s, c, 0) for s, c in zip(seeds, counters)], torch.int64), pivot)
    if top_p is None:
        return tokens
    accepted = top_p >= 1.0
    for round_ in range(1, _MAX_ROUNDS + 1):
        l_s = passes.logit_of(tokens)
        accepted |= passes.mass_above(l_s) < top_p
        if bool(accepted.all()):
            return tokens
        pivot = torch.where(accepted, pivot, l_s)
        keys = to_device([row_key(s, c, round_) for s, c in zip(seeds, counters)], torch.int64)
        tokens = torch.where(accepted, tokens, passes.race(keys, pivot))
    raise RuntimeError(f"top-p sampling rejected {_MAX_ROUNDS} draws in a row (a bug)")
