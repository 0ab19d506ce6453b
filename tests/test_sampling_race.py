"""The batched sampler's draws: the right distribution, top-p exactly as sort-and-truncate defines it, the
same draw for the same (seed, position) whatever the batch, and the Triton kernel equal to the torch path."""

from __future__ import annotations

import pytest
import torch

from tprun.worker import sampling_race


def _to_device(values, dtype):
    return torch.tensor(values, dtype=dtype)


def _logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * 2


def _sample(logits, top_p, seeds, counters):
    rows = logits.shape[0]
    return sampling_race.sample(logits, torch.ones(rows), None if top_p is None else torch.full((rows,), top_p),
                                seeds, counters, _to_device)


def _top_p_set(p: torch.Tensor, top_p: float) -> set[int]:
    """Sort and truncate: the smallest prefix (by probability) whose mass reaches top_p."""
    order = p.argsort(descending=True).tolist()
    kept, mass = set(), 0.0
    for t in order:
        if mass >= top_p:
            break
        kept.add(t)
        mass += p[t].item()
    return kept


def test_draws_follow_the_distribution_restricted_to_the_top_p_set():
    vocab, top_p, draws = 12, 0.8, 6000
    logits = _logits(1, vocab, 0)
    p = torch.softmax(logits[0], -1)
    allowed = _top_p_set(p, top_p)
    counts = torch.zeros(vocab)
    # One row per position: draw k is the request's k-th token (counter k).
    tokens = _sample(logits.expand(draws, vocab).contiguous(), top_p, [7] * draws, list(range(draws)))
    counts.index_add_(0, tokens, torch.ones(draws))
    assert set(torch.nonzero(counts).flatten().tolist()) <= allowed
    want = torch.zeros(vocab)
    want[list(allowed)] = p[list(allowed)]
    want /= want.sum()
    # Binomial standard deviation of each frequency is at most 0.0065 here: 5 sigma.
    assert (counts / draws - want).abs().max() < 0.033


def test_a_draw_depends_only_on_seed_and_position_not_on_the_batch():
    logits = _logits(5, 300, 1)
    seeds, counters = [11, 12, 13, 14, 15], [0, 3, 9, 1, 4]
    together = _sample(logits, 0.9, seeds, counters)
    alone = [_sample(logits[i:i + 1], 0.9, seeds[i:i + 1], counters[i:i + 1]).item() for i in range(5)]
    assert together.tolist() == alone
    moved = _sample(logits, 0.9, seeds, [c + 1 for c in counters])
    assert moved.tolist() != together.tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels need a CUDA device")
def test_triton_passes_draw_what_the_torch_passes_draw():
    from tprun.worker.sampling_race_cuda import TritonPasses

    logits = _logits(64, 151936, 2).cuda().to(torch.bfloat16)
    logits[::5, ::7] = float("-inf")  # top-k / min-p masking leaves -inf behind
    temp = torch.linspace(0.5, 1.5, 64, device="cuda")
    keys = torch.tensor([sampling_race.row_key(s, 5, 0) for s in range(64)], dtype=torch.int64, device="cuda")
    ref, fast = sampling_race.TorchPasses(logits, temp), TritonPasses(logits, temp)
    pivot = torch.full((64,), float("-inf"), device="cuda", dtype=logits.dtype)
    pivot[::3] = logits[::3].float().median(dim=-1).values.to(logits.dtype)
    got, want = fast.race(keys, pivot), ref.race(keys, pivot)
    # One exp or log may round differently in the two paths: a near-tie is the only allowed difference.
    assert (got == want).float().mean() >= 0.95
    l_s = ref.logit_of(want)
    assert torch.equal(fast.logit_of(want), l_s)
    torch.testing.assert_close(fast.mass_above(l_s), ref.mass_above(l_s), rtol=1e-4, atol=1e-6)


def test_a_token_holding_almost_all_the_mass_is_accepted_at_once():
    """The top token is never "more likely than itself": top_p below its own mass still takes it."""
    logits = torch.full((4, 50), -10.0)
    logits[:, 7] = 10.0
    assert _sample(logits, 0.5, [1, 2, 3, 4], [0, 0, 0, 0]).tolist() == [7, 7, 7, 7]
