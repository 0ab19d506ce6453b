"""The Triton paged-attention backend against a float64 reference, on fresh random inputs each run.

Runs on a CUDA device. Without one it skips, unless TRITON_INTERPRET=1 and triton is installed: then the
same kernels run in Triton's CPU interpreter (slow, but it checks indexing and masking anywhere).
Unused cache slots are filled with NaN, so a kernel reading a slot outside a sequence's blocks shows up
as NaN in its output, and outputs are NaN-poisoned before each run so an unwritten element shows too.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import pytest
import torch

from tests.triton_support import DEVICE, skip_module_without_triton

skip_module_without_triton("the Triton attention backend")
pytestmark = pytest.mark.gpu

from tprun.worker.attention_metadata import AttentionMetadata  # noqa: E402
from tprun.worker.layers import attention_cuda as ac  # noqa: E402

# Relative L2 error allowed per dtype: bf16/fp16 operands (P is rounded to the input dtype before P@V, as
# in flash attention), float32 uses IEEE dots.
TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-5}


@dataclass
class Batch:
    meta: AttentionMetadata
    q: torch.Tensor  # [T, nh, hd]
    k_new: torch.Tensor  # [T, nkv, hd]: the step's new tokens, not yet in the cache
    v_new: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    ctx_k: list[torch.Tensor]  # per sequence, float64 [seq_len, nkv, hd]: its whole context after the step
    ctx_v: list[torch.Tensor]
    written: torch.Tensor  # bool [num_blocks * block_size]: slots that hold a token after the step


def make_batch(seqs: list[tuple[int, int]], num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
               dtype: torch.dtype, gen: torch.Generator) -> Batch:
    """seqs: (cached prefix length, new query tokens) per sequence; pages are scattered at random."""
    blocks_per_seq = [-(-(p + n) // block_size) for p, n in seqs]
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks stay NaN: nothing may read them
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    block_tables = torch.full((len(seqs), max(blocks_per_seq)), -1, dtype=torch.int32)
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    flat_k, flat_v = k_cache.view(-1, num_kv_heads, head_dim), v_cache.view(-1, num_kv_heads, head_dim)
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    qs, k_new, v_new, slots, ctx_k, ctx_v = [], [], [], [], [], []
    for b, ((prefix, n), nblocks) in enumerate(zip(seqs, blocks_per_seq)):
        pages = [perm.pop() for _ in range(nblocks)]
        block_tables[b, :nblocks] = torch.tensor(pages, dtype=torch.int32)
        seq_slots = torch.tensor([pages[i // block_size] * block_size + i % block_size for i in range(prefix + n)])
        k = torch.randn(prefix + n, num_kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(prefix + n, num_kv_heads, head_dim, generator=gen).to(dtype)
        flat_k[seq_slots[:prefix]] = k[:prefix]
        flat_v[seq_slots[:prefix]] = v[:prefix]
        written[seq_slots] = True
        qs.append(torch.randn(n, num_heads, head_dim, generator=gen).to(dtype))
        k_new.append(k[prefix:])
        v_new.append(v[prefix:])
        slots.append(seq_slots[prefix:])
        ctx_k.append(k.double())
        ctx_v.append(v.double())
    q_lens = [n for _, n in seqs]
    seq_lens = [p + n for p, n in seqs]
    cu = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    meta = AttentionMetadata(
        is_prefill=any(n != 1 for n in q_lens), cu_seqlens_q=cu.to(DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        slot_mapping=torch.cat(slots).to(torch.int64).to(DEVICE), block_tables=block_tables.to(DEVICE),
        query_lens_list=q_lens, seq_lens_list=seq_lens, block_size=block_size,
    )
    return Batch(meta, torch.cat(qs).to(DEVICE), torch.cat(k_new).to(DEVICE), torch.cat(v_new).to(DEVICE),
                 k_cache.to(DEVICE), v_cache.to(DEVICE), ctx_k, ctx_v, written)


def reference(batch: Batch, scale: float, window: int | None = None, softcap: float | None = None,
              sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its whole context, in float64 on the CPU
    (with a window, query position p sees keys in (p - window, p], as transformers' Mistral does; softcap:
    scores -> cap * tanh(scores / cap) as Gemma 2; sinks [nh]: one extra logit per head in the softmax's
    denominator, as gpt-oss)."""
    q = batch.q.double().cpu()
    cu = batch.meta.cu_seqlens_q.tolist()
    outs = []
    for b, (k, v) in enumerate(zip(batch.ctx_k, batch.ctx_v)):
        qb = q[cu[b]:cu[b + 1]]
        group = qb.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qb, k) * scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        pos = k.shape[0] - qb.shape[0] + torch.arange(qb.shape[0])
        key_pos = torch.arange(k.shape[0])[None, :]
        hidden = key_pos > pos[:, None]
        if window is not None:
            hidden |= key_pos <= pos[:, None] - window
        scores = scores.masked_fill(hidden, float("-inf"))
        if sinks is not None:
            sink = sinks.double().cpu()[:, None, None].expand(-1, scores.shape[1], 1)
            probs = torch.cat([scores, sink], dim=-1).softmax(-1)[..., :-1]
        else:
            probs = scores.softmax(-1)
        outs.append(torch.einsum("hqk,khd->qhd", probs, v))
    return torch.cat(outs)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.double().cpu()
    assert not out.isnan().any(), "NaN in the output: an unwritten element or a read of an unused cache slot"
    return ((out - ref).norm() / ref.norm()).item()


def skip_if_interpreter_cannot(dtype: torch.dtype) -> None:
    if DEVICE == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's CPU interpreter (3.6) computes bfloat16 dots wrongly; bfloat16 runs on the GPU")


def fresh_generator() -> tuple[torch.Generator, int]:
    seed = secrets.randbits(31)
    return torch.Generator().manual_seed(seed), seed


SHAPES = [  # (num_heads, num_kv_heads, head_dim): MHA, GQA groups 2 (qwen3-0.6b), 4 (llama3-8b), 8
    (4, 4, 64), (16, 8, 128), (8, 2, 128), (16, 2, 64),
]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.parametrize("block_size", [1, 16, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"h{s[0]}kv{s[1]}d{s[2]}")
def test_prefill_over_cached_prefix_matches_float64(shape, dtype, block_size):
    skip_if_interpreter_cannot(dtype)
    gen, seed = fresh_generator()
    # Ragged: fresh prompts, cached prefixes, one-token queries mixed in, tiles of 128 queries crossed.
    seqs = [(0, 37), (5, 1), (100, 129), (300, 7), (0, 1), (17, 200)]
    batch = make_batch(seqs, *shape, block_size, dtype, gen)
    scale = shape[2] ** -0.5
    out = ac.paged_attention(batch.q, batch.k_new, batch.v_new, batch.k_cache, batch.v_cache, batch.meta, scale)
    err = rel_err(out.view_as(batch.q), reference(batch, scale))
    assert err < TOL[dtype], f"relative error {err:.2e} (seed {seed})"


@pytest.mark.parametrize("block_size", [1, 16, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"h{s[0]}kv{s[1]}d{s[2]}")
def test_decode_matches_float64(shape, dtype, block_size):
    skip_if_interpreter_cannot(dtype)
    gen, seed = fresh_generator()
    # Context lengths around the split-KV partition size, far past it, and a single token.
    p = ac.DECODE_PARTITION
    lens = [1, 2, p - 1, p, p + 1, 3 * p + 17] + torch.randint(1, 4 * p, (4,), generator=gen).tolist()
    batch = make_batch([(n - 1, 1) for n in lens], *shape, block_size, dtype, gen)
    scale = shape[2] ** -0.5
    ac.store_kvcache(batch.k_new, batch.v_new, batch.k_cache, batch.v_cache, batch.meta.slot_mapping)
    out = torch.full_like(batch.q, float("nan"))
    ac.decode_attention(batch.q, batch.k_cache, batch.v_cache, batch.meta.seq_lens, batch.meta.block_tables,
                        scale, out=out)
    err = rel_err(out, reference(batch, scale))
    assert err < TOL[dtype], f"relative error {err:.2e} (seed {seed})"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_decode_of_a_large_batch_uses_wide_partitions_and_matches_float64(dtype):
    skip_if_interpreter_cannot(dtype)
    gen, seed = fresh_generator()
    nh, nkv, hd = 16, 8, 64
    batch = ac.WIDE_FROM_PROGRAMS // nkv
    assert ac.decode_partition(batch, nkv) == ac.WIDE_DECODE_PARTITION
    p = ac.WIDE_DECODE_PARTITION
    lens = torch.randint(1, 3 * p, (batch,), generator=gen)
    lens[:6] = torch.tensor([1, p - 1, p, p + 1, 2 * p, 2 * p + 1])
    decode = make_batch([(n - 1, 1) for n in lens.tolist()], nh, nkv, hd, 16, dtype, gen)
    out = ac.paged_attention(decode.q, decode.k_new, decode.v_new, decode.k_cache, decode.v_cache, decode.meta,
                             hd**-0.5)
    err = rel_err(out.view_as(decode.q), reference(decode, hd**-0.5))
    assert err < TOL[dtype], f"relative error {err:.2e} (seed {seed})"


@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sliding_window_prefill_and_decode_match_float64(dtype, block_size):
    """Mistral-style windows: tiles whose first rows see none of a key block must not produce NaN."""
    skip_if_interpreter_cannot(dtype)
    gen, seed = fresh_generator()
    window, scale = 100, 64**-0.5
    prefill = make_batch([(0, 300), (150, 90), (3, 5), (400, 1)], 8, 2, 64, block_size, dtype, gen)
    out = ac.paged_attention(prefill.q, prefill.k_new, prefill.v_new, prefill.k_cache, prefill.v_cache,
                             prefill.meta, scale, sliding_window=window)
    err = rel_err(out.view_as(prefill.q), reference(prefill, scale, window))
    assert err < TOL[dtype], f"prefill: relative error {err:.2e} (seed {seed})"
    lens = [1, 99, 100, 101, ac.DECODE_PARTITION + 50, 3 * ac.DECODE_PARTITION + 1]
    decode = make_batch([(n - 1, 1) for n in lens], 8, 2, 64, block_size, dtype, gen)
    out = ac.paged_attention(decode.q, decode.k_new, decode.v_new, decode.k_cache, decode.v_cache, decode.meta,
                             scale, sliding_window=window)
    err = rel_err(out.view_as(decode.q), reference(decode, scale, window))
    assert err < TOL[dtype], f"decode: relative error {err:.2e} (seed {seed})"


def test_store_writes_exactly_the_given_slots_and_skips_minus_one():
    gen, seed = fresh_generator()
    batch = make_batch([(3, 5), (0, 9)], 8, 2, 64, 16, torch.bfloat16, gen)
    slots = batch.meta.slot_mapping.clone()
    slots[2] = -1  # a padding token: must not be stored anywhere
    ac.store_kvcache(batch.k_new, batch.v_new, batch.k_cache, batch.v_cache, slots)
    flat_k = batch.k_cache.view(-1, *batch.k_cache.shape[2:]).cpu()
    flat_v = batch.v_cache.view(-1, *batch.v_cache.shape[2:]).cpu()
    keep = slots >= 0
    assert torch.equal(flat_k[slots[keep].cpu()], batch.k_new[keep].cpu())
    assert torch.equal(flat_v[slots[keep].cpu()], batch.v_new[keep].cpu())
    untouched = ~batch.written
    untouched[batch.meta.slot_mapping[2].item()] = True
    assert flat_k[untouched].isnan().all() and flat_v[untouched].isnan().all(), f"stray write (seed {seed})"


def test_decode_padding_entry_writes_zeros():
    """CUDA-graph batches pad with entries of seq_len 0 and slot -1: they must stay finite and harmless."""
    gen, _ = fresh_generator()
    batch = make_batch([(40, 1), (0, 1)], 8, 2, 64, 16, torch.float16, gen)
    batch.meta.seq_lens[1] = 0
    out = torch.full_like(batch.q, float("nan"))
    ac.decode_attention(batch.q, batch.k_cache, batch.v_cache, batch.meta.seq_lens, batch.meta.block_tables,
                        1.0, out=out)
    assert torch.equal(out[1].cpu(), torch.zeros_like(out[1]).cpu())
    assert not out[0].isnan().any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_prefill_then_decode_steps_follow_the_layer_contract(dtype):
    """Through paged_attention: prefill writes the cache that the following decode steps read."""
    skip_if_interpreter_cannot(dtype)
    gen, seed = fresh_generator()
    nh, nkv, hd, bs = 16, 8, 128, 16
    prompts, steps = [23, 1, 70], 3
    total = [n + steps for n in prompts]
    full = make_batch([(0, n) for n in total], nh, nkv, hd, bs, dtype, gen)  # pages for every step
    scale = hd**-0.5
    flat_k_new, flat_v_new = full.k_new, full.v_new  # [sum(total), nkv, hd], all tokens of every sequence
    starts = [0] + torch.tensor(total).cumsum(0).tolist()
    all_slots = full.meta.slot_mapping
    for step in range(steps + 1):
        # step 0: prefill the prompts; then one token per sequence per step.
        lo = [0 if step == 0 else prompts[b] + step - 1 for b in range(3)]
        hi = [prompts[b] + step for b in range(3)]
        idx = torch.cat([torch.arange(starts[b] + lo[b], starts[b] + hi[b]) for b in range(3)]).to(DEVICE)
        q = torch.randn(len(idx), nh, hd, generator=gen).to(dtype).to(DEVICE)
        q_lens = [end - start for start, end in zip(lo, hi)]
        meta = AttentionMetadata(
            is_prefill=step == 0,
            cu_seqlens_q=torch.tensor([0] + q_lens, device=DEVICE).cumsum(0).to(torch.int32),
            seq_lens=torch.tensor(hi, dtype=torch.int32, device=DEVICE), slot_mapping=all_slots[idx],
            block_tables=full.meta.block_tables, query_lens_list=q_lens, seq_lens_list=hi, block_size=bs,
        )
        out = ac.paged_attention(q, flat_k_new[idx], flat_v_new[idx], full.k_cache, full.v_cache, meta, scale)
        ref_batch = Batch(meta, q, None, None, None, None,
                          [full.ctx_k[b][:hi[b]] for b in range(3)], [full.ctx_v[b][:hi[b]] for b in range(3)],
                          None)
        err = rel_err(out.view_as(q), reference(ref_batch, scale))
        assert err < TOL[dtype], f"step {step}: relative error {err:.2e} (seed {seed})"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_decode_replayed_from_a_cuda_graph_follows_new_lengths_and_tables():
    gen, seed = fresh_generator()
    nh, nkv, hd, bs, batch_size, max_blocks = 32, 8, 128, 16, 8, 64
    first = make_batch([(n - 1, 1) for n in [5] * batch_size], nh, nkv, hd, bs, torch.bfloat16, gen)
    # Static buffers, as the model runner keeps them: the table has room for max_blocks pages.
    q = first.q.clone()
    seq_lens = first.meta.seq_lens.clone()
    tables = torch.full((batch_size, max_blocks), -1, dtype=torch.int32, device=DEVICE)
    tables[:, : first.meta.block_tables.shape[1]] = first.meta.block_tables
    k_cache = torch.full((batch_size * max_blocks + 3, bs, nkv, hd), float("nan"), dtype=torch.bfloat16,
                         device=DEVICE)
    v_cache = torch.full_like(k_cache, float("nan"))
    out = torch.empty_like(q)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compiles) outside the capture
        ac.decode_attention(q, k_cache, v_cache, seq_lens, tables, hd**-0.5, out=out)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ac.decode_attention(q, k_cache, v_cache, seq_lens, tables, hd**-0.5, out=out)
    for lens in ([1, 300, 17, 999, 256, 257, 64, 1000], [800] * batch_size):
        batch = make_batch([(n - 1, 1) for n in lens], nh, nkv, hd, bs, torch.bfloat16, gen)
        ac.store_kvcache(batch.k_new, batch.v_new, batch.k_cache, batch.v_cache, batch.meta.slot_mapping)
        # The new step's data goes into the same buffers; the graph's kernels see it on replay.
        k_cache[: batch.k_cache.shape[0]] = batch.k_cache
        v_cache[: batch.v_cache.shape[0]] = batch.v_cache
        q.copy_(batch.q)
        seq_lens.copy_(batch.meta.seq_lens)
        tables.fill_(-1)
        tables[:, : batch.meta.block_tables.shape[1]] = batch.meta.block_tables
        out.fill_(float("nan"))
        graph.replay()
        err = rel_err(out, reference(batch, hd**-0.5))
        assert err < TOL[torch.bfloat16], f"lengths {lens}: relative error {err:.2e} (seed {seed})"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window", [None, 100], ids=["full", "window100"])
@pytest.mark.parametrize("feature", ["softcap", "sinks"])
def test_softcap_and_sinks_prefill_and_decode_match_float64(feature, window, dtype):
    """Gemma 2's soft-capping (cap 50 and a small cap that bends most scores) and gpt-oss's sinks (large
    ones that take most of the mass, small ones that take none), with and without a sliding window."""
    skip_if_interpreter_cannot(dtype)
    gen, seed = fresh_generator()
    nh, nkv, hd, bs = 8, 2, 64, 16
    scale = hd**-0.5
    for cap in ([50.0, 0.5] if feature == "softcap" else [None]):
        sinks = None
        if feature == "sinks":
            sinks = (torch.randn(nh, generator=gen) * 3).to(dtype).to(DEVICE)
        kw = {"softcap": cap, "sinks": sinks}
        prefill = make_batch([(0, 150), (130, 70), (3, 5), (300, 1)], nh, nkv, hd, bs, dtype, gen)
        out = ac.paged_attention(prefill.q, prefill.k_new, prefill.v_new, prefill.k_cache, prefill.v_cache,
                                 prefill.meta, scale, window, **kw)
        err = rel_err(out.view_as(prefill.q), reference(prefill, scale, window, **kw))
        assert err < TOL[dtype], f"prefill {kw}: relative error {err:.2e} (seed {seed})"
        p = ac.DECODE_PARTITION
        lens = [1, 99, 100, 101, p, p + 50, 3 * p + 1]
        decode = make_batch([(n - 1, 1) for n in lens], nh, nkv, hd, bs, dtype, gen)
        out = ac.paged_attention(decode.q, decode.k_new, decode.v_new, decode.k_cache, decode.v_cache,
                                 decode.meta, scale, window, **kw)
        err = rel_err(out.view_as(decode.q), reference(decode, scale, window, **kw))
        assert err < TOL[dtype], f"decode {kw}: relative error {err:.2e} (seed {seed})"


def test_decode_padding_entry_with_sinks_writes_zeros():
    gen, _ = fresh_generator()
    batch = make_batch([(40, 1), (0, 1)], 8, 2, 64, 16, torch.float16, gen)
    batch.meta.seq_lens[1] = 0
    out = torch.full_like(batch.q, float("nan"))
    sinks = torch.randn(8, generator=gen).to(torch.float16).to(DEVICE)
    ac.decode_attention(batch.q, batch.k_cache, batch.v_cache, batch.meta.seq_lens, batch.meta.block_tables,
                        1.0, out=out, sinks=sinks)
    assert torch.equal(out[1].cpu(), torch.zeros_like(out[1]).cpu())
    assert not out[0].isnan().any()
