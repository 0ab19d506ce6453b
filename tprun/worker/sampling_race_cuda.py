"""The passes of sampling_race.py as Triton kernels, for bf16, fp16 and fp32 logits. Each pass splits every
row into CHUNKS slices, one program each: a single program walking a 151,936-token row serially is bound by
its load latency, and a small batch would leave most of the GPU idle. A program reads its slice, computes
e = exp(logit / T - M), p = e / Z and the noise (the same integer hash as the torch version) in registers
and writes its slice's partials (max and sum; masses above the thresholds; best score and its index). The
next launch combines a row's partials in chunk order. CHUNKS is a constant and nothing is summed through
atomics, so the order of every sum, hence every cut and draw, is the same on every rank and at every batch
size. Kernels launch with fp fusion off and libdevice's exp and log, IEEE division: the formulas round as
torch's do, which keeps the race's scores equal to the torch path's."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from tprun.worker.sampling_race import key_space

# A power of two (the combines load a row's partials as one tile), never a function of the batch. Measured on
# an H200 (256 rows of 151,936 bf16 logits), 16 beat 32, 64 and 128 by 8-60 % on the cut, which is compute
# bound there: more slices only add prologues.
_CHUNKS = 16
# The cut splits its key interval 2^4 ways per pass (4 passes for 16-bit logits, 8 for fp32), keeping
# [ways, block] partial sums in registers: ways along dim 0, so x and p broadcast without shuffles. Each way
# costs ~5 instructions per token and a pass ~40 more, so 2^3 or 2^2 ways (6 or 8 passes) cost the same.
_LOG2_WAYS = 4
_BLOCK = {"stats": 1024, "cut": 512, "race": 1024}
_STAGES = 3
_FORMAT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# Triton's interpreter (TRITON_INTERPRET=1, which runs these kernels on CPU tensors) has no libdevice.
_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def _exp(x):
    if _INTERPRET:
        y = tl.exp(x)
    else:
        y = libdevice.exp(x)
    return y


@triton.jit
def _log(x):
    if _INTERPRET:
        y = tl.log(x)
    else:
        y = libdevice.log(x)
    return y


@triton.jit
def _key_of(v, FORMAT: tl.constexpr):
    """A float32 value representable in the logits' format -> its int64 key (sampling_race.key_space)."""
    if FORMAT == 0:
        raw = v.to(tl.int32, bitcast=True).to(tl.int64)
        key = tl.where(raw >= 0, raw, raw ^ 0x7FFFFFFF)
    else:
        if FORMAT == 1:
            raw = v.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int64)
        else:
            raw = v.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int64)
        key = tl.where(raw >= 0, raw, raw ^ 0x7FFF)
    return key


@triton.jit
def _value_of(key, FORMAT: tl.constexpr):
    """int64 key -> the value, exactly, as float32."""
    if FORMAT == 0:
        raw = tl.where(key >= 0, key, key ^ 0x7FFFFFFF)
        v = raw.to(tl.int32).to(tl.float32, bitcast=True)
    else:
        raw = tl.where(key >= 0, key, key ^ 0x7FFF).to(tl.int16)
        if FORMAT == 1:
            v = raw.to(tl.bfloat16, bitcast=True).to(tl.float32)
        else:
            v = raw.to(tl.float16, bitcast=True).to(tl.float32)
    return v


@triton.jit
def _slice(L, stride, chunk_len, vocab):
    """This program's row base pointer and its slice [start, end) of the row."""
    start = tl.program_id(1) * chunk_len
    return L + tl.program_id(0).to(tl.int64) * stride, start, tl.minimum(start + chunk_len, vocab)


@triton.jit
def _stats_kernel(L, InvT, Part, vocab, stride, chunk_len, CHUNKS: tl.constexpr, BLOCK: tl.constexpr,
                  STAGES: tl.constexpr):
    """Per slice: the largest stored logit, m = max(logit / T) and sum(exp(logit / T - m))."""
    row = tl.program_id(0)
    base, lo, hi = _slice(L, stride, chunk_len, vocab)
    inv_t = tl.load(InvT + row)
    xm = tl.full((), float("-inf"), tl.float32)
    m = tl.full((), -1e30, tl.float32)  # finite: a block of -inf (masked tokens) must not make NaN
    z = tl.full((), 0.0, tl.float32)
    for start in tl.range(lo, hi, BLOCK, num_stages=STAGES):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(base + offs, mask=offs < hi, other=float("-inf")).to(tl.float32)
        xm = tl.maximum(xm, tl.max(x, axis=0))
        s = x * inv_t
        new_m = tl.maximum(m, tl.max(s, axis=0))
        z = z * _exp(m - new_m) + tl.sum(_exp(s - new_m), axis=0)
        m = new_m
    out = Part + row * 3 * CHUNKS + tl.program_id(1)
    tl.store(out, xm)
    tl.store(out + CHUNKS, m)
    tl.store(out + 2 * CHUNKS, z)


@triton.jit
def _stats_finish_kernel(Part, XMax, M, InvZ, CHUNKS: tl.constexpr):
    """Per row: the largest stored logit, M = max(logit / T) and 1 / Z from the slices' partials."""
    row = tl.program_id(0)
    part = Part + row * 3 * CHUNKS + tl.arange(0, CHUNKS)
    ms = tl.load(part + CHUNKS)
    m = tl.max(ms, axis=0)
    z = tl.sum(tl.load(part + 2 * CHUNKS) * _exp(ms - m), axis=0)
    tl.store(XMax + row, tl.max(tl.load(part), axis=0))
    tl.store(M + row, m)
    tl.store(InvZ + row, tl.math.div_rn(1.0, z))


@triton.jit
def _narrow(Bounds, Mass, top_p, LOG2_WAYS: tl.constexpr, CHUNKS: tl.constexpr):
    """The key interval (lo, hi] a pass searched and the masses it found -> the sub-interval where the mass
    crosses top_p. Key 0 of a pass is lo itself (no news)."""
    row = tl.program_id(0)
    lo = tl.load(Bounds + 2 * row)
    hi = tl.load(Bounds + 2 * row + 1)
    ways = tl.arange(0, 1 << LOG2_WAYS)
    keys = lo + (((hi - lo) * ways.to(tl.int64)) >> LOG2_WAYS)
    part = Mass + (row * CHUNKS + tl.arange(0, CHUNKS))[:, None] * (1 << LOG2_WAYS) + ways[None, :]
    good = (keys > lo) & (tl.sum(tl.load(part), axis=0) < top_p)
    return tl.max(tl.where(good, lo, keys), axis=0), tl.min(tl.where(good, keys, hi), axis=0)


@triton.jit
def _cut_kernel(L, InvT, M, InvZ, XMax, TopP, BoundsIn, MassIn, BoundsOut, MassOut, vocab, stride, chunk_len,
                FIRST: tl.constexpr, FORMAT: tl.constexpr, LO_KEY: tl.constexpr, LOG2_WAYS: tl.constexpr,
                CHUNKS: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    """One pass of TorchPasses.cut's search: the slice's mass above 2^LOG2_WAYS keys spread over (lo, hi].
    The interval comes from the previous pass's partials (every program of a row narrows it alike; the
    first slice's program records it for the next pass); the first pass starts at (-inf, row max]."""
    row = tl.program_id(0)
    base, first, end = _slice(L, stride, chunk_len, vocab)
    top_p = tl.load(TopP + row)
    if FIRST:
        lo = tl.full((), LO_KEY, tl.int64)
        hi = tl.where(top_p >= 1.0, lo + 1, _key_of(tl.load(XMax + row), FORMAT))
    else:
        lo, hi = _narrow(BoundsIn, MassIn, top_p, LOG2_WAYS, CHUNKS)
    if tl.program_id(1) == 0:
        tl.store(BoundsOut + 2 * row, lo)
        tl.store(BoundsOut + 2 * row + 1, hi)
    inv_t = tl.load(InvT + row)
    m = tl.load(M + row)
    inv_z = tl.load(InvZ + row)
    ways = tl.arange(0, 1 << LOG2_WAYS)
    thresholds = _value_of(lo + (((hi - lo) * ways.to(tl.int64)) >> LOG2_WAYS), FORMAT)
    floor = _value_of(lo, FORMAT)
    acc = tl.zeros((1 << LOG2_WAYS, BLOCK), tl.float32)
    for start in tl.range(first, end, BLOCK, num_stages=STAGES):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(base + offs, mask=offs < end, other=float("-inf")).to(tl.float32)
        # A block with nothing above lo adds only zeros: skipping it changes no bit of the sums.
        if tl.max(x, axis=0) > floor:
            p = _exp(x * inv_t - m) * inv_z
            acc += tl.where(x[None, :] > thresholds[:, None], p[None, :], 0.0)
    tl.store(MassOut + (row * CHUNKS + tl.program_id(1)) * (1 << LOG2_WAYS) + ways, tl.sum(acc, axis=1))


@triton.jit
def _cut_finish_kernel(TopP, Bounds, Mass, Tau, FORMAT: tl.constexpr, LOG2_WAYS: tl.constexpr,
                       CHUNKS: tl.constexpr):
    row = tl.program_id(0)
    _, hi = _narrow(Bounds, Mass, tl.load(TopP + row), LOG2_WAYS, CHUNKS)
    tl.store(Tau + row, _value_of(hi, FORMAT))


@triton.jit
def _race_kernel(L, InvT, M, Keys, Tau, Best, Arg, vocab, stride, chunk_len, CHUNKS: tl.constexpr,
                 BLOCK: tl.constexpr, STAGES: tl.constexpr):
    """Per slice: the best exp(logit / T - M) / E over tokens whose logit is >= tau, and its first index."""
    row = tl.program_id(0)
    base, first, end = _slice(L, stride, chunk_len, vocab)
    inv_t = tl.load(InvT + row)
    m = tl.load(M + row)
    key = tl.load(Keys + row).to(tl.uint32)
    tau = tl.load(Tau + row)
    best = tl.full((), -2.0, tl.float32)
    best_i = tl.full((), 0, tl.int32)
    for start in tl.range(first, end, BLOCK, num_stages=STAGES):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(base + offs, mask=offs < end, other=float("-inf")).to(tl.float32)
        if tl.max(x, axis=0) >= tau:  # tau is finite: masked and out-of-range tokens never compete
            e = _exp(x * inv_t - m)
            # uint32 arithmetic wraps as the torch version's int64 masked to 32 bits, at a third of the cost.
            h = offs.to(tl.uint32) * 0x9E3779B1 + key
            h = h ^ (h >> 16)
            h = h * 0x7FEB352D
            h = h ^ (h >> 15)
            h = h * 0x846CA68B
            h = h ^ (h >> 16)
            u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
            score = tl.where(x >= tau, tl.math.div_rn(e, -_log(u)), -1.0)
            block_best = tl.max(score, axis=0)
            block_arg = tl.argmax(score, axis=0) + start
            best_i = tl.where(block_best > best, block_arg, best_i)  # the first maximum wins, as torch.argmax
            best = tl.maximum(best, block_best)
    tl.store(Best + row * CHUNKS + tl.program_id(1), best)
    tl.store(Arg + row * CHUNKS + tl.program_id(1), best_i)


@triton.jit
def _race_finish_kernel(Best, Arg, Out, CHUNKS: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.argmax(tl.load(Best + row * CHUNKS + tl.arange(0, CHUNKS)), axis=0)  # the first, on a tie
    tl.store(Out + row, tl.load(Arg + row * CHUNKS + chunk).to(tl.int64))


class TritonPasses:
    """TorchPasses' interface on CUDA; the stats pass runs at construction."""

    def __init__(self, logits: torch.Tensor, temp: torch.Tensor) -> None:
        self.dtype = logits.dtype
        self.logits = logits.contiguous()
        self.rows, self.vocab = self.logits.shape
        self.inv_t = (1.0 / temp.float()).contiguous()  # torch's division, as in TorchPasses
        self.xmax, self.m, self.inv_z = (self._empty(self.rows) for _ in range(3))
        part = self._empty(self.rows, 3, _CHUNKS)
        self._launch(_stats_kernel, "stats", self.inv_t, part)
        self._finish(_stats_finish_kernel, part, self.xmax, self.m, self.inv_z)

    def _empty(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self.logits.device)

    def _launch(self, kernel, name: str, *args, **constexprs) -> None:
        """A pass over the logits: a program per (row, slice); a slice is whole blocks."""
        block = _BLOCK[name]
        chunk_len = triton.cdiv(triton.cdiv(self.vocab, _CHUNKS), block) * block
        kernel[(self.rows, _CHUNKS)](self.logits, *args, self.vocab, self.logits.stride(0), chunk_len,
                                     **constexprs, CHUNKS=_CHUNKS, BLOCK=block, STAGES=_STAGES, num_warps=4,
                                     enable_fp_fusion=False)

    def _finish(self, kernel, *args, **constexprs) -> None:
        """A combine of each row's partials, in chunk order: a program per row."""
        kernel[(self.rows,)](*args, **constexprs, CHUNKS=_CHUNKS, num_warps=1, enable_fp_fusion=False)

    def cut(self, top_p: torch.Tensor) -> torch.Tensor:
        bits, lo_key = key_space(self.dtype)
        top_p = top_p.float().contiguous()
        fmt = _FORMAT[self.dtype]
        # Pass j reads side (j + 1) % 2 and writes side j % 2: no program reads what its own launch writes.
        bounds = self._empty(2, self.rows, 2, dtype=torch.int64)
        mass = self._empty(2, self.rows, _CHUNKS, 1 << _LOG2_WAYS)
        passes = triton.cdiv(bits, _LOG2_WAYS)
        for j in range(passes):
            self._launch(_cut_kernel, "cut", self.inv_t, self.m, self.inv_z, self.xmax, top_p,
                         bounds[(j + 1) % 2], mass[(j + 1) % 2], bounds[j % 2], mass[j % 2], FIRST=j == 0,
                         FORMAT=fmt, LO_KEY=lo_key, LOG2_WAYS=_LOG2_WAYS)
        tau = self._empty(self.rows)
        last = (passes - 1) % 2
        self._finish(_cut_finish_kernel, top_p, bounds[last], mass[last], tau, FORMAT=fmt, LOG2_WAYS=_LOG2_WAYS)
        return tau

    def race(self, keys: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        best, arg = self._empty(self.rows, _CHUNKS), self._empty(self.rows, _CHUNKS, dtype=torch.int32)
        self._launch(_race_kernel, "race", self.inv_t, self.m, keys.contiguous(), tau.float().contiguous(), best,
                     arg)
        out = self._empty(self.rows, dtype=torch.int64)
        self._finish(_race_finish_kernel, best, arg, out)
        return out
