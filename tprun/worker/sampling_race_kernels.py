"""The Triton kernels of sampling_race_cuda.py (which launches them and says how they split the work)."""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

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
def _stats_start():
    """The running stats before any block: m is finite, so a block of -inf (masked tokens) makes no NaN."""
    return tl.full((), float("-inf"), tl.float32), tl.full((), -1e30, tl.float32), tl.full((), 0.0, tl.float32)


@triton.jit
def _stats_store(Part, xm, m, z, CHUNKS: tl.constexpr):
    """This slice's stats partials, where stats_finish_kernel reads them."""
    out = Part + tl.program_id(0) * 3 * CHUNKS + tl.program_id(1)
    tl.store(out, xm)
    tl.store(out + CHUNKS, m)
    tl.store(out + 2 * CHUNKS, z)


@triton.jit
def _stats_update(x, s, xm, m, z):
    """One block into the running (largest logit, max of s = logit / T, sum of exp(s - max))."""
    new_m = tl.maximum(m, tl.max(s, axis=0))
    return tl.maximum(xm, tl.max(x, axis=0)), new_m, z * _exp(m - new_m) + tl.sum(_exp(s - new_m), axis=0)


@triton.jit
def stats_kernel(L, InvT, Part, vocab, stride, chunk_len, CHUNKS: tl.constexpr, BLOCK: tl.constexpr,
                  STAGES: tl.constexpr):
    """Per slice: the largest stored logit, m = max(logit / T) and sum(exp(logit / T - m))."""
    row = tl.program_id(0)
    base, lo, hi = _slice(L, stride, chunk_len, vocab)
    inv_t = tl.load(InvT + row)
    xm, m, z = _stats_start()
    for start in tl.range(lo, hi, BLOCK, num_stages=STAGES):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(base + offs, mask=offs < hi, other=float("-inf")).to(tl.float32)
        xm, m, z = _stats_update(x, x * inv_t, xm, m, z)
    _stats_store(Part, xm, m, z, CHUNKS)


@triton.jit
def stats_finish_kernel(Part, XMax, M, InvZ, CHUNKS: tl.constexpr):
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
def cut_kernel(L, InvT, M, InvZ, XMax, TopP, Skip, BoundsIn, MassIn, BoundsOut, MassOut, vocab, stride, chunk_len,
                FIRST: tl.constexpr, FORMAT: tl.constexpr, LO_KEY: tl.constexpr, LOG2_WAYS: tl.constexpr,
                CHUNKS: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    """One pass of TorchPasses.cut's search: the slice's mass above 2^LOG2_WAYS keys spread over (lo, hi].
    The interval comes from the previous pass's partials (every program of a row narrows it alike; the
    first slice's program records it for the next pass); the first pass starts at (-inf, row max]."""
    row = tl.program_id(0)
    base, first, end = _slice(L, stride, chunk_len, vocab)
    end = tl.where(tl.load(Skip + row) != 0, first, end)  # a skipped row reads nothing (its result is unused)
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
def cut_finish_kernel(TopP, Bounds, Mass, Tau, FORMAT: tl.constexpr, LOG2_WAYS: tl.constexpr,
                       CHUNKS: tl.constexpr):
    row = tl.program_id(0)
    _, hi = _narrow(Bounds, Mass, tl.load(TopP + row), LOG2_WAYS, CHUNKS)
    tl.store(Tau + row, _value_of(hi, FORMAT))


@triton.jit
def race_kernel(L, InvT, Keys, Tau, Skip, Best, Arg, StatsPart, vocab, stride, chunk_len, STATS: tl.constexpr,
                CHUNKS: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    """Per slice: the best score logit / T * log2(e) - log2(-log2(u)) over tokens whose logit is >= tau, and
    its first index; with STATS, also stats_kernel's partials, from the same read of the logits."""
    row = tl.program_id(0)
    base, first, end = _slice(L, stride, chunk_len, vocab)
    end = tl.where(tl.load(Skip + row) != 0, first, end)
    inv_t = tl.load(InvT + row)
    key = tl.load(Keys + row).to(tl.uint32)
    tau = tl.load(Tau + row)
    best = tl.full((), float("-inf"), tl.float32)
    best_i = tl.full((), 0, tl.int32)
    xm, m, z = _stats_start()
    for start in tl.range(first, end, BLOCK, num_stages=STAGES):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(base + offs, mask=offs < end, other=float("-inf")).to(tl.float32)
        s = x * inv_t
        if STATS:
            xm, m, z = _stats_update(x, s, xm, m, z)
        if tl.max(x, axis=0) >= tau:  # tau is finite: masked and out-of-range tokens never compete
            # uint32 arithmetic wraps as the torch version's int64 masked to 32 bits, at a third of the cost.
            h = offs.to(tl.uint32) * 0x9E3779B1 + key
            h = h ^ (h >> 16)
            h = h * 0x7FEB352D
            h = h ^ (h >> 15)
            h = h * 0x846CA68B
            h = h ^ (h >> 16)
            u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
            score = tl.where(x >= tau, s * 1.4426950408889634 - tl.log2(-tl.log2(u)), float("-inf"))
            block_best = tl.max(score, axis=0)
            block_arg = tl.argmax(score, axis=0) + start
            best_i = tl.where(block_best > best, block_arg, best_i)  # the first maximum wins, as torch.argmax
            best = tl.maximum(best, block_best)
    tl.store(Best + row * CHUNKS + tl.program_id(1), best)
    tl.store(Arg + row * CHUNKS + tl.program_id(1), best_i)
    if STATS:
        _stats_store(StatsPart, xm, m, z, CHUNKS)


@triton.jit
def mass_kernel(L, InvT, M, InvZ, Thr, Part, vocab, stride, chunk_len, CHUNKS: tl.constexpr, BLOCK: tl.constexpr,
                 STAGES: tl.constexpr):
    """Per slice: the mass of tokens whose logit is above the row's threshold, summed as a cut pass sums
    one of its thresholds."""
    row = tl.program_id(0)
    base, first, end = _slice(L, stride, chunk_len, vocab)
    inv_t = tl.load(InvT + row)
    m = tl.load(M + row)
    inv_z = tl.load(InvZ + row)
    thr = tl.load(Thr + row)
    acc = tl.zeros((1, BLOCK), tl.float32)
    for start in tl.range(first, end, BLOCK, num_stages=STAGES):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(base + offs, mask=offs < end, other=float("-inf")).to(tl.float32)
        if tl.max(x, axis=0) > thr:  # only zeros otherwise
            p = _exp(x * inv_t - m) * inv_z
            acc += tl.where(x[None, :] > thr, p[None, :], 0.0)
    tl.store(Part + row * CHUNKS + tl.program_id(1), tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit
def mass_finish_kernel(Part, Out, CHUNKS: tl.constexpr):
    row = tl.program_id(0)
    tl.store(Out + row, tl.sum(tl.load(Part + row * CHUNKS + tl.arange(0, CHUNKS)), axis=0))


@triton.jit
def race_finish_kernel(Best, Arg, Out, CHUNKS: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.argmax(tl.load(Best + row * CHUNKS + tl.arange(0, CHUNKS)), axis=0)  # the first, on a tie
    tl.store(Out + row, tl.load(Arg + row * CHUNKS + chunk).to(tl.int64))
