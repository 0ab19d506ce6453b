"""The passes of sampling_race.py as Triton kernels, for bf16, fp16 and fp32 logits. Each pass splits every
row into CHUNKS slices, one program each: a single program walking a 151,936-token row serially is bound by
its load latency, and a small batch would leave most of the GPU idle. A program reads its slice, computes
p = exp(logit / T - M) / Z and the noise (the same integer hash as the torch version) in registers and
writes its slice's partials (max and sum; masses above the thresholds; best score and its index). The next
launch combines a row's partials in chunk order. CHUNKS is a constant and nothing is summed through atomics,
so the order of every sum, hence every cut and draw, is the same on every rank and at every batch size.
The first race of a draw also computes the row stats (M, Z) in the same read of the logits: the race's
scores need neither. Kernels launch with fp fusion off; p uses libdevice's exp (as torch rounds), the race's
scores the hardware's log2, which may round differently from torch: the two paths then differ only at a near
tie of scores."""

from __future__ import annotations

import torch
import triton

from tprun.worker.sampling_race import key_space
from tprun.worker.sampling_race_kernels import (
    cut_finish_kernel,
    cut_kernel,
    mass_finish_kernel,
    mass_kernel,
    race_finish_kernel,
    race_kernel,
    stats_finish_kernel,
    stats_kernel,
)

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


class TritonPasses:
    """TorchPasses' interface on CUDA. The row stats (xmax, m, inv_z) come from the first race over every row,
    or from a pass of their own when something needs them first."""

    def __init__(self, logits: torch.Tensor, temp: torch.Tensor) -> None:
        self.dtype = logits.dtype
        self.logits = logits.contiguous()
        self.rows, self.vocab = self.logits.shape
        self.inv_t = (1.0 / temp.float()).contiguous()  # torch's division, as in TorchPasses
        self._stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _finish_stats(self, part: torch.Tensor) -> None:
        self._stats = tuple(self._empty(self.rows) for _ in range(3))
        self._finish(stats_finish_kernel, part, *self._stats)

    def _row_stats(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._stats is None:
            part = self._empty(self.rows, 3, _CHUNKS)
            self._launch(stats_kernel, "stats", self.inv_t, part)
            self._finish_stats(part)
        return self._stats

    xmax = property(lambda self: self._row_stats()[0])
    m = property(lambda self: self._row_stats()[1])
    inv_z = property(lambda self: self._row_stats()[2])

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

    def _skip(self, skip: torch.Tensor | None) -> torch.Tensor:
        if skip is None:
            return torch.zeros(self.rows, dtype=torch.int8, device=self.logits.device)
        return skip.to(torch.int8).contiguous()

    def logit_of(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.logits.gather(1, tokens[:, None])[:, 0].float()

    def mass_above(self, x: torch.Tensor) -> torch.Tensor:
        part, out = self._empty(self.rows, _CHUNKS), self._empty(self.rows)
        self._launch(mass_kernel, "cut", self.inv_t, self.m, self.inv_z, x.float().contiguous(), part)
        self._finish(mass_finish_kernel, part, out)
        return out

    def cut(self, top_p: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        bits, lo_key = key_space(self.dtype)
        top_p = top_p.float().contiguous()
        skip = self._skip(skip)
        fmt = _FORMAT[self.dtype]
        # Pass j reads side (j + 1) % 2 and writes side j % 2: no program reads what its own launch writes.
        bounds = self._empty(2, self.rows, 2, dtype=torch.int64)
        mass = self._empty(2, self.rows, _CHUNKS, 1 << _LOG2_WAYS)
        passes = triton.cdiv(bits, _LOG2_WAYS)
        for j in range(passes):
            self._launch(cut_kernel, "cut", self.inv_t, self.m, self.inv_z, self.xmax, top_p, skip,
                         bounds[(j + 1) % 2], mass[(j + 1) % 2], bounds[j % 2], mass[j % 2], FIRST=j == 0,
                         FORMAT=fmt, LO_KEY=lo_key, LOG2_WAYS=_LOG2_WAYS)
        tau = self._empty(self.rows)
        last = (passes - 1) % 2
        self._finish(cut_finish_kernel, top_p, bounds[last], mass[last], tau, FORMAT=fmt, LOG2_WAYS=_LOG2_WAYS)
        return tau

    def race(self, keys: torch.Tensor, tau: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        best, arg = self._empty(self.rows, _CHUNKS), self._empty(self.rows, _CHUNKS, dtype=torch.int32)
        stats = self._stats is None and skip is None  # every row read whole: the stats come for free
        part = self._empty(self.rows, 3, _CHUNKS) if stats else best
        self._launch(race_kernel, "race", self.inv_t, keys.contiguous(), tau.float().contiguous(),
                     self._skip(skip), best, arg, part, STATS=stats)
        out = self._empty(self.rows, dtype=torch.int64)
        self._finish(race_finish_kernel, best, arg, out)
        if stats:
            self._finish_stats(part)
        return out
