"""The passes of sampling_race.py as Triton kernels: each reads a row's logits once, computing
p = exp(logit / T - M) / Z and the noise (the same integer hash as the torch version) in registers."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 2048


@triton.jit
def _stats_kernel(L, Temp, M, Z, vocab, stride, BLOCK: tl.constexpr):
    """Per row: M = max(logit / T), Z = sum(exp(logit / T - M)), online over blocks."""
    row = tl.program_id(0)
    inv_t = 1.0 / tl.load(Temp + row).to(tl.float32)
    m = tl.full((), -1e30, tl.float32)  # finite: a block of -inf (masked tokens) must not make NaN
    z = tl.full((), 0.0, tl.float32)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(L + row.to(tl.int64) * stride + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
        x = x * inv_t
        new_m = tl.maximum(m, tl.max(x, axis=0))
        z = z * tl.exp(m - new_m) + tl.sum(tl.exp(x - new_m), axis=0)
        m = new_m
    tl.store(M + row, m)
    tl.store(Z + row, z)


@triton.jit
def _race_kernel(L, Temp, M, Z, Keys, Pivot, Out, vocab, stride, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    inv_t = 1.0 / tl.load(Temp + row).to(tl.float32)
    m = tl.load(M + row)
    inv_z = 1.0 / tl.load(Z + row)
    key = tl.load(Keys + row)
    pivot = tl.load(Pivot + row).to(tl.float32)
    best = tl.full((), -2.0, tl.float32)
    best_i = tl.full((), 0, tl.int64)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < vocab
        x = tl.load(L + row.to(tl.int64) * stride + offs, mask=inside, other=float("-inf")).to(tl.float32)
        p = tl.exp(x * inv_t - m) * inv_z
        # int64 arithmetic masked to 32 bits: the same values as the torch version's.
        h = (offs.to(tl.int64) * 0x9E3779B1 + key) & 0xFFFFFFFF
        h = h ^ (h >> 16)
        h = (h * 0x7FEB352D) & 0xFFFFFFFF
        h = h ^ (h >> 15)
        h = (h * 0x846CA68B) & 0xFFFFFFFF
        h = h ^ (h >> 16)
        u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        score = tl.where(inside & (x > pivot), p / -tl.log(u), -1.0)
        block_best = tl.max(score, axis=0)
        block_arg = tl.argmax(score, axis=0).to(tl.int64) + start
        best_i = tl.where(block_best > best, block_arg, best_i)  # the first maximum wins, as torch.argmax
        best = tl.maximum(best, block_best)
    tl.store(Out + row, best_i)


@triton.jit
def _mass_kernel(L, Temp, M, Z, Ls, Out, vocab, stride, BLOCK: tl.constexpr):
    """Per row: the probability mass of tokens whose stored logit is above l_s."""
    row = tl.program_id(0)
    inv_t = 1.0 / tl.load(Temp + row).to(tl.float32)
    m = tl.load(M + row)
    inv_z = 1.0 / tl.load(Z + row)
    ls = tl.load(Ls + row).to(tl.float32)
    acc = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(L + row.to(tl.int64) * stride + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
        p = tl.exp(x * inv_t - m) * inv_z
        acc += tl.where(x > ls, p, 0.0)
    tl.store(Out + row, tl.sum(acc, axis=0))


class TritonPasses:
    def __init__(self, logits: torch.Tensor, temp: torch.Tensor) -> None:
        self.logits = logits.contiguous()
        self.temp = temp.float().contiguous()
        rows, self.vocab = self.logits.shape
        self.m = torch.empty(rows, dtype=torch.float32, device=logits.device)
        self.z = torch.empty_like(self.m)
        self._launch(_stats_kernel, self.temp, self.m, self.z)

    def _launch(self, kernel, *args) -> None:
        kernel[(self.logits.shape[0],)](self.logits, *args, self.vocab, self.logits.stride(0), BLOCK=_BLOCK,
                                        num_warps=8)

    def race(self, keys: torch.Tensor, pivot: torch.Tensor) -> torch.Tensor:
        out = torch.empty(self.logits.shape[0], dtype=torch.int64, device=self.logits.device)
        self._launch(_race_kernel, self.temp, self.m, self.z, keys, pivot.float().contiguous(), out)
        return out

    def logit_of(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.logits.gather(1, tokens[:, None])[:, 0]

    def mass_above(self, logit: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(self.m)
        self._launch(_mass_kernel, self.temp, self.m, self.z, logit.float().contiguous(), out)
        return out
