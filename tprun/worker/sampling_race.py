"""Seeded sampling for a whole batch at once: an exponential race with counter-based noise, and exact
top-p found by a fixed-length search instead of a sort. Nothing here waits for the device: the engine
schedules one step ahead (the host prepares step N+1 while the device runs step N, and sampled tokens feed
step N+1 on the device), so a host synchronisation in sampling would stall every step.

Noise. Token t of a row gets E = -log(u), u uniform from a hash of (row key, t); the row key hashes the
request's seed and how many tokens it has generated. The noise is thus a pure function of the request and
its position: the same on every rank, in any batch, after preemption or chunked prefill, and it needs no
generator state and no per-row kernel. argmax(p / E) is a draw from p (the exponential race, equivalent to
Gumbel-max); it is computed as argmax(log2(p) - log2(E)), and since log2(E) = log2(-log2(u)) + log2(ln 2)
and log2(p) = logit / T * log2(e) - log2(Z), as argmax(logit / T * log2(e) - log2(-log2(u))): two log2 a
token and no row stats, so the first race can compute the stats in the same read.

Top-p. With p = softmax(logit / T) from each row's max M and sum Z, token t is in the top-p set iff
mass_above(l_t) < top_p, mass_above(x) being the mass of tokens whose stored logit is strictly above x:
"more likely" compares stored logits, never recomputed probabilities, and the top token is always in.
mass_above cannot grow with x (a fixed-order sum whose terms are zeroed one by one, and rounding is
monotone), so the set is {t : l_t >= tau}, tau the smallest value of the logits' dtype with
mass_above(tau) < top_p. The dtype's values, ordered as integers (keys below), number at most 2^16 or 2^32,
so a search of fixed length finds tau exactly for every row at once with no data-dependent control flow.
One race among the tokens >= tau then draws from p renormalised on the set, which is what sorting and
truncating gives. Rows with top_p >= 1 cut only masked (-inf) tokens.

Rounding. On CUDA the passes (stats, cut, race) are Triton kernels that split each row into a constant
number of slices and combine the slices' partials in slice order, without atomics: every rank, at every
batch size, sums in the same order and finds the same cut. Elsewhere the same hash and formulas run in torch.
The two paths' race scores are equal wherever their log2 round alike, and their cuts can differ only where a
mass is within rounding of top_p.
"""

from __future__ import annotations

import torch

LOG2E = 1.4426950408889634
MASK32 = 0xFFFFFFFF
MASK64 = (1 << 64) - 1

# Width and bit pattern of -inf of each logits dtype: the key space the cut is searched in.
_FLOAT_BITS = {torch.bfloat16: (16, 0xFF80), torch.float16: (16, 0xFC00), torch.float32: (32, 0xFF800000),
               torch.float64: (64, 0xFFF0000000000000)}
_INT_OF_WIDTH = {16: torch.int16, 32: torch.int32, 64: torch.int64}


def row_key(seed: int, counter: int, round_: int) -> int:
    """splitmix64 of the request's seed, its generated-token count and a stream number, to 32 bits."""
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


def key_space(dtype: torch.dtype) -> tuple[int, int]:
    """(bits, key of -inf) of a logits dtype. A key is the value's bit pattern as a signed integer with the
    magnitude bits of negatives flipped: integer order is then float order (-0 just below +0)."""
    bits, neg_inf = _FLOAT_BITS[dtype]
    return bits, (neg_inf - (1 << bits)) ^ ((1 << (bits - 1)) - 1)


def to_key(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Values representable in dtype -> int64 keys."""
    bits = _FLOAT_BITS[dtype][0]
    raw = values.to(dtype).view(_INT_OF_WIDTH[bits]).to(torch.int64)
    return torch.where(raw >= 0, raw, raw ^ ((1 << (bits - 1)) - 1))


def from_key(keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int64 keys -> the values, exactly, in float32 (float64 for float64 logits)."""
    bits = _FLOAT_BITS[dtype][0]
    raw = torch.where(keys >= 0, keys, keys ^ ((1 << (bits - 1)) - 1))
    values = raw.to(_INT_OF_WIDTH[bits]).view(dtype)
    return values if dtype == torch.float64 else values.float()


class TorchPasses:
    """The passes over [R, V] logits in torch (any device), vectorised over rows. p and the race's numerator
    are materialised; the Triton passes compute the same formulas in registers."""

    def __init__(self, logits: torch.Tensor, temp: torch.Tensor) -> None:
        self.dtype = logits.dtype
        self.x = logits if logits.dtype == torch.float64 else logits.float()  # compared as stored
        self.s = s = self.x.float() * (1.0 / temp.float())[:, None]
        self.xmax = self.x.max(dim=-1).values
        self.m = s.max(dim=-1).values
        self.e = torch.exp(s - self.m[:, None])
        self.p = self.e * (1.0 / self.e.sum(dim=-1))[:, None]

    def mass_above(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(self.x > x[:, None], self.p, 0.0).sum(dim=-1)

    def cut(self, top_p: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """Per row, the smallest value tau of the dtype with mass_above(tau) < top_p, by halving the key
        interval (lo, hi]: lo's mass is known to reach top_p (-inf's by convention), hi is the best cut so
        far (the row max at first, whose mass is 0). Each interval holds under 2^bits keys."""
        bits, lo_key = key_space(self.dtype)
        lo = torch.full(top_p.shape, lo_key, dtype=torch.int64, device=top_p.device)
        hi = torch.where(top_p >= 1.0, lo + 1, to_key(self.xmax, self.dtype))
        for _ in range(bits):
            mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without int64 overflow
            good = (mid > lo) & (self.mass_above(from_key(mid, self.dtype)) < top_p)
            hi = torch.where(good, mid, hi)
            lo = torch.where(good, lo, mid)
        return from_key(hi, self.dtype)

    def logit_of(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.x.gather(1, tokens[:, None])[:, 0]

    def scores(self, keys: torch.Tensor) -> torch.Tensor:
        """The race's score of every token: logit / T * log2(e) - log2(-log2(u))."""
        return self.s * LOG2E - torch.log2(-torch.log2(uniform(keys, self.x.shape[-1])))

    def race(self, keys: torch.Tensor, tau: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """skip (rows whose result is not needed) only saves work on CUDA; here every row is computed."""
        score = torch.where(self.x >= tau[:, None], self.scores(keys), float("-inf"))
        return score.argmax(dim=-1)  # the first maximum wins, as in the Triton kernel


def no_cut(dtype: torch.dtype, rows: int, device: torch.device) -> torch.Tensor:
    """The cut of rows that keep every unmasked token: the dtype's lowest finite value."""
    return torch.full((rows,), torch.finfo(dtype).min, dtype=torch.float64 if dtype == torch.float64
                      else torch.float32, device=device)


def draw(passes, keys: torch.Tensor, top_p: torch.Tensor | None) -> torch.Tensor:
    """One token per row: the race among each row's top-p set (top_p None: no row cuts).

    The race's winner over every token also wins over the top-p set whenever it belongs to it (the set is a
    subset, the noise the same): only the rows whose winner falls outside, about 1 - top_p of them, need
    the cut and a second race. The other rows' programs skip both on the device, with no host decision."""
    rows = keys.shape[0]
    first = passes.race(keys, no_cut(passes.dtype, rows, keys.device))
    if top_p is None:
        return first
    top_p = top_p.float()
    inside = (top_p >= 1.0) | (passes.mass_above(passes.logit_of(first)) < top_p)
    return torch.where(inside, first, passes.race(keys, passes.cut(top_p, skip=inside), skip=inside))


def sample(logits: torch.Tensor, temp: torch.Tensor, top_p: torch.Tensor | None, seeds: list[int],
           counters: list[int], to_device) -> torch.Tensor:
    """One token per row from softmax(logits / temp) (top-k and min-p already masked to -inf), restricted
    to each row's top-p set (top_p None: no row restricts). Returns a device tensor; never waits for it."""
    if logits.is_cuda and logits.dtype != torch.float64:  # float64 (a test precision) stays in torch
        from tprun.worker.sampling_race_cuda import TritonPasses as Passes
    else:
        Passes = TorchPasses
    keys = to_device([row_key(s, c, 0) for s, c in zip(seeds, counters)], torch.int64)
    return draw(Passes(logits, temp), keys, top_p)
