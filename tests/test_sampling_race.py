"""The batched sampler's draws: the top-p set exactly as sort-and-truncate defines it, the right distribution
on it, the same draw for the same (seed, position) whatever the batch, no host synchronisation, and the
Triton kernels equal to the torch path (on CUDA, or in Triton's interpreter on CPU)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.procs import ROOT
from tprun.worker import sampling_race as sr

CUDA = torch.cuda.is_available()
INF = float("inf")


def _to_device_on(device: str):
    def to_device(values, dtype):
        t = torch.tensor(values, dtype=dtype)
        return t.pin_memory().to(device, non_blocking=True) if device == "cuda" else t  # as the sampler does
    return to_device


def _rows(dtype: torch.dtype, rows: int, vocab: int, seed: int, device: str = "cpu"):
    """Logits from flat to peaked, with ties (rounded rows, a tied top) and -inf masks; temperatures; top_p
    values including 1 and tiny ones."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g) * torch.linspace(0.3, 6.0, rows)[:, None]
    x[1::4] = (x[1::4] * 2).round() / 2
    x[2::4] = x[2::4].masked_fill(torch.rand(x[2::4].shape, generator=g) < 0.6, -INF)
    x[3::8, : vocab // 50 + 1] = x[3::8].max(dim=-1, keepdim=True).values
    top_p = torch.rand(rows, generator=g)
    top_p[::7], top_p[1::7], top_p[2::7] = 1.0, 1e-6, 0.999
    temp = 0.5 + torch.rand(rows, generator=g)
    return x.to(dtype).to(device), temp.to(device), top_p.to(device)


def _sorted_top_p_mass(logits: torch.Tensor, temp: torch.Tensor) -> torch.Tensor:
    """Sort and accumulate in float64: per token, the mass of tokens strictly more likely (a tie group
    shares the mass before its first member)."""
    x = logits.double()
    p = torch.softmax(x / temp.double()[:, None], dim=-1)
    vals, order = x.sort(dim=-1, descending=True)
    ps = p.gather(1, order)
    before = ps.cumsum(dim=-1) - ps
    first = torch.searchsorted(-vals, -vals, side="left")
    return torch.empty_like(p).scatter_(1, order, before.gather(1, first))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_cut_keeps_exactly_the_sort_and_truncate_top_p_set(dtype):
    logits, temp, top_p = _rows(dtype, 56, 400, seed=1)
    passes = sr.TorchPasses(logits, temp)
    tau = passes.cut(top_p)
    x = passes.x
    kept = x >= tau[:, None]
    # Exact against the search's own sums: tau's mass is below top_p, the next lower value's is not.
    lowest = torch.finfo(dtype).min
    cut = top_p < 1.0
    assert torch.equal(tau[~cut], torch.full_like(tau[~cut], lowest))
    assert (passes.mass_above(tau)[cut] < top_p[cut]).all()
    below = sr.from_key(sr.to_key(tau, dtype) - 1, dtype)
    assert (passes.mass_above(below)[cut & (tau > lowest)] >= top_p[cut & (tau > lowest)]).all()
    # Against sort and truncate in float64: equal but where a mass is within rounding of top_p.
    above = _sorted_top_p_mass(logits, temp)
    want = ((above < top_p[:, None]) | (top_p[:, None] >= 1.0)) & (x > -INF)
    ambiguous = ((above - top_p[:, None]).abs() < 1e-5) & cut[:, None] & (x > -INF)
    assert torch.equal(kept & ~ambiguous, want & ~ambiguous)
    assert ambiguous.float().mean() < 0.01  # tail tokens of the top_p=0.999 rows, each adding < 1e-5
    assert not (kept & (x == -INF)).any()
    # top_p 1e-6: the top token (and the tokens tied with it) alone.
    tiny = top_p == 1e-6
    assert torch.equal(kept[tiny], x[tiny] == passes.xmax[tiny, None])
    assert (kept.sum(-1)[3::8] >= 400 // 50 + 1).all()  # a tied top is kept whole


@pytest.mark.parametrize("dtype,top_p", [(torch.float32, 0.8), (torch.bfloat16, 0.7), (torch.float32, None)])
def test_draws_follow_the_distribution_restricted_to_the_top_p_set(dtype, top_p):
    vocab, draws = 12, 20000
    row = torch.tensor([[2.0, 1.5, 1.5, 1.0, 0.5, 0.25, 0.0, -0.5, -INF, -1.0, -2.0, -INF]]).to(dtype)
    p = torch.softmax(row[0].double(), -1)
    logits = row.expand(draws, vocab).contiguous()
    top_ps = None if top_p is None else torch.full((draws,), top_p)
    # One row per position: draw k is the request's k-th token (counter k).
    tokens = sr.sample(logits, torch.ones(draws), top_ps, [7] * draws, list(range(draws)), _to_device_on("cpu"))
    freq = torch.bincount(tokens, minlength=vocab).double() / draws
    above = _sorted_top_p_mass(row, torch.ones(1))[0]
    allowed = (above < (top_p or 2.0)) & (row[0] > -INF)
    assert 2 < allowed.sum() < 10 or top_p is None
    want = torch.where(allowed, p, 0.0)
    want /= want.sum()
    assert (freq[~allowed] == 0).all()
    assert (freq[want > 0.02] > 0).all()
    # Each frequency's binomial standard deviation is at most 0.0036 here: 5.5 sigma.
    assert (freq - want).abs().max() < 0.02


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_draw_depends_only_on_seed_and_position_not_on_the_batch(dtype):
    logits, temp, top_p = _rows(dtype, 12, 300, seed=2)
    seeds, counters = list(range(100, 112)), [0, 3, 9, 1, 4, 4, 2, 8, 0, 5, 7, 6]
    to_device = _to_device_on("cpu")
    together = sr.sample(logits, temp, top_p, seeds, counters, to_device)
    alone = torch.cat([sr.sample(logits[i:i + 1], temp[i:i + 1], top_p[i:i + 1], seeds[i:i + 1],
                                 counters[i:i + 1], to_device) for i in range(12)])
    assert torch.equal(together, alone)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    shuffled = sr.sample(logits[order], temp[order], top_p[order], [seeds[i] for i in order],
                         [counters[i] for i in order], to_device)
    assert torch.equal(shuffled, together[order])
    moved = sr.sample(logits, temp, top_p, seeds, [c + 1 for c in counters], to_device)
    assert not torch.equal(moved, together)


def test_a_token_holding_almost_all_the_mass_is_kept_alone():
    """The top token is never "more likely than itself": top_p below its own mass still takes it."""
    logits = torch.full((4, 50), -10.0)
    logits[:, 7] = 10.0
    tokens = sr.sample(logits, torch.ones(4), torch.full((4,), 0.5), [1, 2, 3, 4], [0] * 4, _to_device_on("cpu"))
    assert tokens.tolist() == [7, 7, 7, 7]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_first_winner_inside_the_top_p_set_is_the_draw(dtype):
    """draw() races once over every token and cuts only the rows whose winner is outside the set: the same
    tokens as cutting every row first."""
    logits, temp, top_p = _rows(dtype, 64, 500, seed=8)
    passes = sr.TorchPasses(logits, temp)
    for counter in range(5):
        keys = torch.tensor([sr.row_key(s, counter, 0) for s in range(64)], dtype=torch.int64)
        first = passes.race(keys, sr.no_cut(dtype, 64, "cpu"))
        inside = passes.mass_above(passes.logit_of(first)) < top_p
        assert 0 < int(inside.sum()) < 64  # both paths are taken
        assert torch.equal(sr.draw(passes, keys, top_p), passes.race(keys, passes.cut(top_p)))


def _no_host_reads(*_, **__):
    raise AssertionError("sampling read a tensor on the host")


@pytest.mark.parametrize("top_p", [0.9, None])
def test_sampling_never_reads_a_tensor_on_the_host(monkeypatch, top_p):
    """The engine schedules one step ahead: a host read would wait for the device in the middle of a step."""
    device = "cuda" if CUDA else "cpu"
    logits, temp, top_ps = _rows(torch.bfloat16, 16, 5000, seed=3, device=device)
    top_ps = None if top_p is None else top_ps
    args = (logits, temp, top_ps, list(range(16)), [5] * 16, _to_device_on(device))
    want = sr.sample(*args)  # compiles the kernels outside the check
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, _no_host_reads)
    monkeypatch.setattr(torch, "nonzero", _no_host_reads)
    if CUDA:
        torch.cuda.set_sync_debug_mode("error")
    try:
        got = sr.sample(*args)
    finally:
        if CUDA:
            torch.cuda.set_sync_debug_mode("default")
    monkeypatch.undo()
    assert torch.equal(got, want)


def check_triton_matches_torch(device: str, rows: int, vocab: int) -> None:
    """The Triton passes against TorchPasses on the same device. The cut may differ only where a mass is
    within rounding of top_p (the two sum in different orders); the race, given the same cut, may differ
    only at a near tie of scores (exp and log may round differently)."""
    from tprun.worker.sampling_race_cuda import TritonPasses

    for dtype, seed in ((torch.bfloat16, 4), (torch.float16, 5), (torch.float32, 6)):
        logits, temp, top_p = _rows(dtype, rows, vocab, seed, device)
        keys = torch.tensor([sr.row_key(s, 5, 0) for s in range(rows)], dtype=torch.int64, device=device)
        ref, fast, fused = sr.TorchPasses(logits, temp), TritonPasses(logits, temp), TritonPasses(logits, temp)
        assert torch.equal(fast.xmax, ref.xmax) and torch.equal(fast.m, ref.m)
        torch.testing.assert_close(fast.inv_z, 1.0 / ref.e.sum(-1), rtol=1e-5, atol=0)
        fused.race(keys, sr.no_cut(dtype, rows, device))  # a first race over whole rows computes the stats too
        assert all(torch.equal(a, b) for a, b in zip((fused.xmax, fused.m, fused.inv_z),
                                                      (fast.xmax, fast.m, fast.inv_z), strict=True))
        tau, want_tau = fast.cut(top_p), ref.cut(top_p)
        below = sr.from_key(sr.to_key(tau, dtype) - 1, dtype)
        near = torch.minimum((ref.mass_above(tau) - top_p).abs(), (ref.mass_above(below) - top_p).abs()) < 1e-5
        assert ((tau == want_tau) | near).all(), (dtype, tau[tau != want_tau], want_tau[tau != want_tau])
        for cut in (want_tau, sr.no_cut(dtype, rows, device)):
            got, want = fast.race(keys, cut), ref.race(keys, cut)
            score = ref.scores(keys)
            gap = (score.gather(1, got[:, None]) - score.gather(1, want[:, None])).abs()[:, 0]
            assert ((got == want) | (gap < 1e-4)).all(), (dtype, got[got != want], want[got != want])
            assert (got != want).sum() <= 1
            assert (logits.gather(1, got[:, None])[:, 0].float() >= cut).all()
        thr = ref.logit_of(ref.race(keys, sr.no_cut(dtype, rows, device)))
        torch.testing.assert_close(fast.mass_above(thr), ref.mass_above(thr), rtol=1e-5, atol=1e-6)
        assert (sr.draw(fast, keys, top_p) != sr.draw(ref, keys, top_p)).sum() <= 1  # near ties or rounding only


@pytest.mark.skipif(not CUDA, reason="the Triton kernels need a CUDA device")
def test_triton_passes_draw_what_the_torch_passes_draw():
    from tprun.worker.sampling_race_cuda import TritonPasses

    check_triton_matches_torch("cuda", 64, 151936)
    logits, temp, top_p = _rows(torch.bfloat16, 256, 151936, seed=7, device="cuda")
    keys = torch.tensor([sr.row_key(s, 3, 0) for s in range(256)], dtype=torch.int64, device="cuda")
    got = sr.draw(TritonPasses(logits, temp), keys, top_p)
    want = sr.draw(sr.TorchPasses(logits, temp), keys, top_p)
    assert (got != want).sum() <= 1  # only a near tie or a mass within rounding of top_p may differ


@pytest.mark.skipif(CUDA, reason="CUDA runs the compiled kernels instead")
def test_triton_kernels_match_the_torch_passes_in_the_interpreter():
    pytest.importorskip("triton")
    code = "from tests.test_sampling_race import check_triton_matches_torch as c; c('cpu', 4, 1200)"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
