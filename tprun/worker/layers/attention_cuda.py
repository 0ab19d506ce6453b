"""Paged attention on CUDA in Triton: KV-cache store, prefill over a cached prefix, split-KV decode.

Cache layout (one tensor each for K and V, per layer): [num_blocks, block_size, num_kv_heads, head_dim].
Every kernel finds a token's slot through the block table (page = block_tables[b, pos // block_size]), so
any block size works and prefill needs no separate path for a cached prefix: the new tokens' K/V are
stored first, then each query attends to its sequence's whole context straight from the cache.

Decode is split-KV ("flash-decoding"): each (sequence, KV head, partition of PARTITION tokens) program
handles all query heads of its GQA group, so K/V are read once per group, and a second kernel merges the
partitions by their log-sum-exp. The grid depends only on tensor shapes, never on values, so a decode step
can be captured in a CUDA graph. Chosen over flex_attention by measurement: benchmarks/NOTES.md.

Gemma 2's soft-capping (scores -> cap * tanh(scores / cap), before the mask) and gpt-oss's sinks (one
logit per query head that joins every softmax's denominator and carries no value) are compile-time
options of the same kernels: a sink is the online softmax's initial state (running max = sink, sum = 1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tprun.worker.attention_metadata import AttentionMetadata

LOG2E = 1.4426950408889634
# Tokens per decode program. Wider partitions once the batch alone fills the GPU (about 1.5 % faster at
# batch 128-256 on an H100), narrower ones keep small batches parallel: benchmarks/NOTES.md, run 1 sweep.
DECODE_PARTITION = 256
WIDE_DECODE_PARTITION = 512
WIDE_FROM_PROGRAMS = 1024  # batch * num_kv_heads


def decode_partition(batch: int, num_kv_heads: int) -> int:
    return WIDE_DECODE_PARTITION if batch * num_kv_heads >= WIDE_FROM_PROGRAMS else DECODE_PARTITION


def unsupported_reason(head_dim: int, dtype: torch.dtype) -> str | None:
    """Why this backend cannot run a model, or None when it can."""
    if head_dim < 16 or head_dim & (head_dim - 1):
        return f"head_dim {head_dim} is not a power of two >= 16 (Triton tiles need one)"
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype} is not float16, bfloat16 or float32"
    return None


@triton.jit
def _tanh(x):
    """tanh in fp32 (the interpreter has no libdevice): 1 - 2 / (e^2x + 1), and near 0, where that
    cancels, its Taylor series (error below 1e-10 there)."""
    series = x * (1.0 - x * x * (1.0 / 3.0 - x * x * (2.0 / 15.0)))
    return tl.where(tl.abs(x) < 0.05, series, 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0))


@triton.jit
def _scores_log2(qk, qk_scale, softcap, SOFTCAP: tl.constexpr):
    """Raw q.k -> scores in log2 units. qk_scale is scale * log2(e) without soft-capping, else scale."""
    if SOFTCAP:
        return softcap * _tanh(qk * qk_scale / softcap) * 1.4426950408889634
    else:
        return qk * qk_scale


def _qk_scale(scale: float, softcap: float | None) -> float:
    return scale if softcap else scale * LOG2E


# ---------------------------------------------------------------------------------------------- store
@triton.jit
def _store_kv_kernel(K, V, K_cache, V_cache, Slots, stride_kt, stride_kh, stride_vt, stride_vh,
                     NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(Slots + t)
    if slot < 0:  # padding token of a CUDA-graph batch: nothing to store
        return
    offs = tl.arange(0, BLOCK)
    mask = offs < NUM_KV_HEADS * HEAD_DIM
    h = offs // HEAD_DIM
    d = offs % HEAD_DIM
    dst = slot.to(tl.int64) * (NUM_KV_HEADS * HEAD_DIM) + offs
    k = tl.load(K + t * stride_kt + h * stride_kh + d, mask=mask)
    tl.store(K_cache + dst, k, mask=mask)
    v = tl.load(V + t * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(V_cache + dst, v, mask=mask)


def store_kvcache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> None:
    """Write k/v [T, num_kv_heads, head_dim] at their slots; a slot of -1 is skipped."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK=triton.next_power_of_2(num_kv_heads * head_dim),
    )


# -------------------------------------------------------------------------------------------- prefill
@triton.jit
def _prefill_kernel(Q, K_cache, V_cache, Out, Cu_seqlens_q, Seq_lens, Block_tables, scale_log2,
                    stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_cs, stride_ch, stride_bt,
                    window, softcap, Sinks, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_WINDOW: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr):
    m_block = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(Cu_seqlens_q + b)
    q_len = tl.load(Cu_seqlens_q + b + 1) - q_start
    if m_block * BLOCK_M >= q_len:
        return
    seq_len = tl.load(Seq_lens + b)
    prefix = seq_len - q_len  # tokens already in the cache before this step
    kv_h = h // GROUP

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < q_len
    pos_m = prefix + offs_m  # absolute position of each query token
    q = tl.load(Q + (q_start + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=mask_m[:, None], other=0.0)

    if HAS_SINKS:  # the sink as the softmax's first term: exp2(sink - max) = 1 with max = sink
        m_i = tl.zeros([BLOCK_M], tl.float32) + tl.load(Sinks + h).to(tl.float32) * 1.4426950408889634
        l_i = tl.full([BLOCK_M], 1.0, tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # Causal: no query of this tile sees past its last position.
    end = tl.minimum(seq_len, prefix + (m_block + 1) * BLOCK_M)
    lo = 0
    if USE_WINDOW:  # nor further back than the window of its first position
        lo = tl.maximum(prefix + m_block * BLOCK_M - window + 1, 0) // BLOCK_N * BLOCK_N
    for n0 in range(lo, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        page = tl.load(Block_tables + b * stride_bt + offs_n // BLOCK_SIZE, mask=mask_n, other=0)
        row = page.to(tl.int64) * stride_cb + (offs_n % BLOCK_SIZE) * stride_cs + kv_h * stride_ch
        k = tl.load(K_cache + row[:, None] + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        s = _scores_log2(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), scale_log2, softcap, SOFTCAP)
        visible = (offs_n[None, :] <= pos_m[:, None]) & mask_n[None, :]
        if USE_WINDOW:
            visible = visible & (offs_n[None, :] > pos_m[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = m_new
        if USE_WINDOW:  # a row may see no key of this block yet: exp2(-inf - -inf) would be NaN
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V_cache + row[:, None] + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(Out + (q_start + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=mask_m[:, None])


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                      scale: float, out: torch.Tensor | None = None, sliding_window: int | None = None,
                      block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                      num_stages: int | None = None, softcap: float | None = None,
                      sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, num_heads, head_dim] (any query lengths) -> [T, num_heads, head_dim], causal over each context;
    softcap: Gemma 2's attention soft-capping; sinks [num_heads]: gpt-oss's per-head sink logits."""
    num_tokens, num_heads, head_dim = q.shape
    out = torch.empty_like(q) if out is None else out
    if num_tokens == 0:
        return out
    group = num_heads // k_cache.shape[2]
    fp32 = q.dtype == torch.float32
    # (64, 64, 4 warps, 3 stages) was the fastest of six configs on an H100 (benchmarks/NOTES.md).
    block_m = block_m or 64
    block_n = block_n or (32 if fp32 else 64)
    grid = (triton.cdiv(meta.max_seqlen_q, block_m), meta.num_seqs, num_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, meta.cu_seqlens_q, meta.seq_lens, meta.block_tables, _qk_scale(scale, softcap),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), meta.block_tables.stride(0), sliding_window or 0,
        softcap or 0.0, sinks if sinks is not None else q, GROUP=group, BLOCK_SIZE=k_cache.shape[1], HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        USE_WINDOW=sliding_window is not None, DOT_PRECISION="ieee" if fp32 else "tf32",
        SOFTCAP=bool(softcap), HAS_SINKS=sinks is not None,
        num_warps=num_warps or 4, num_stages=num_stages or (1 if fp32 else 3),
    )
    return out


# --------------------------------------------------------------------------------------------- decode
@triton.jit
def _decode_partition_kernel(Q, K_cache, V_cache, Seq_lens, Block_tables, Part_out, Part_lse, scale_log2,
                             stride_qt, stride_qh, stride_cb, stride_cs, stride_ch, stride_bt,
                             stride_pb, stride_ph, stride_pp, window, softcap,
                             GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                             HEAD_DIM: tl.constexpr, PARTITION: tl.constexpr, BLOCK_N: tl.constexpr,
                             USE_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr):
    b = tl.program_id(0)
    kv_h = tl.program_id(1)
    part = tl.program_id(2)
    seq_len = tl.load(Seq_lens + b)
    start = part * PARTITION
    end = tl.minimum(start + PARTITION, seq_len)
    if USE_WINDOW:  # the new token sees only positions > seq_len - 1 - window
        start = tl.maximum(start, seq_len - window)
    if start >= end:  # outside the visible context: the merge kernel never reads this partition
        return

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_g = offs_g < GROUP
    heads = kv_h * GROUP + offs_g
    q = tl.load(Q + b * stride_qt + heads[:, None] * stride_qh + offs_d[None, :], mask=mask_g[:, None],
                other=0.0)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        page = tl.load(Block_tables + b * stride_bt + offs_n // BLOCK_SIZE, mask=mask_n, other=0)
        row = page.to(tl.int64) * stride_cb + (offs_n % BLOCK_SIZE) * stride_cs + kv_h * stride_ch
        k = tl.load(K_cache + row[:, None] + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        v = tl.load(V_cache + row[:, None] + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        s = _scores_log2(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), scale_log2, softcap, SOFTCAP)
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    base = b * stride_pb + heads * stride_ph + part * stride_pp
    tl.store(Part_out + base[:, None] * HEAD_DIM + offs_d[None, :], acc / l_i[:, None], mask=mask_g[:, None])
    tl.store(Part_lse + base, m_i + tl.log2(l_i), mask=mask_g)


@triton.jit
def _decode_merge_kernel(Part_out, Part_lse, Seq_lens, Out, Sinks, stride_ot, stride_oh, stride_pb, stride_ph,
                         stride_pp, window, HEAD_DIM: tl.constexpr, PARTITION: tl.constexpr,
                         USE_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.load(Seq_lens + b)
    num_parts = tl.cdiv(seq_len, PARTITION)
    first = 0
    if USE_WINDOW:
        first = tl.maximum(seq_len - window, 0) // PARTITION
    offs_d = tl.arange(0, HEAD_DIM)
    if HAS_SINKS:  # the sink joins the partitions' merge once, as a partition with no value
        m = tl.zeros([1], tl.float32) + tl.load(Sinks + h).to(tl.float32) * 1.4426950408889634
        total = tl.full([1], 1.0, tl.float32)
    else:
        m = tl.full([1], float("-inf"), tl.float32)
        total = tl.zeros([1], tl.float32)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for p in range(first, num_parts):
        base = b * stride_pb + h * stride_ph + p * stride_pp
        lse = tl.load(Part_lse + base)
        m_new = tl.maximum(m, lse)
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)
        acc = acc * alpha + w * tl.load(Part_out + base * HEAD_DIM + offs_d)
        total = total * alpha + w
        m = m_new
    # A padding entry of a CUDA-graph batch has seq_len 0: write zeros rather than 0/0.
    out = tl.where(total > 0, acc / tl.maximum(total, 1e-30), 0.0)
    tl.store(Out + b * stride_ot + h * stride_oh + offs_d, out.to(Out.dtype.element_ty))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                     block_tables: torch.Tensor, scale: float, out: torch.Tensor | None = None,
                     sliding_window: int | None = None, partition: int | None = None, block_n: int | None = None,
                     num_warps: int = 4, num_stages: int | None = None, softcap: float | None = None,
                     sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, num_heads, head_dim], one new token per sequence -> [B, num_heads, head_dim]."""
    batch, num_heads, head_dim = q.shape
    out = torch.empty_like(q) if out is None else out
    if batch == 0:
        return out
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    block_size = k_cache.shape[1]
    partition = partition or decode_partition(batch, num_kv_heads)
    # From shapes only (the block table's capacity), so a captured graph replays for any context length.
    max_parts = triton.cdiv(block_tables.shape[1] * block_size, partition)
    part_out = torch.empty(batch, num_heads, max_parts, head_dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(batch, num_heads, max_parts, dtype=torch.float32, device=q.device)
    fp32 = q.dtype == torch.float32
    # 16-bit: 128-token tiles, 3 stages were the fastest of 10 configs on an H200 at batch 64-256, 1-1.5 %
    # over (64, 2) (benchmarks/NOTES.md, decode_kernels.py); fp32 tiles of 32 tokens fit shared memory.
    block_n = block_n or (32 if fp32 else 128)
    num_stages = num_stages or (2 if fp32 else 3)
    _decode_partition_kernel[(batch, num_kv_heads, max_parts)](
        q, k_cache, v_cache, seq_lens, block_tables, part_out, part_lse, _qk_scale(scale, softcap),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), part_lse.stride(0), part_lse.stride(1), part_lse.stride(2), sliding_window or 0,
        softcap or 0.0, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim, PARTITION=partition, BLOCK_N=block_n,
        USE_WINDOW=sliding_window is not None, DOT_PRECISION="ieee" if fp32 else "tf32", SOFTCAP=bool(softcap),
        num_warps=num_warps, num_stages=num_stages,
    )
    _decode_merge_kernel[(batch, num_heads)](
        part_out, part_lse, seq_lens, out, sinks if sinks is not None else q, out.stride(0), out.stride(1),
        part_lse.stride(0), part_lse.stride(1), part_lse.stride(2), sliding_window or 0, HEAD_DIM=head_dim,
        PARTITION=partition, USE_WINDOW=sliding_window is not None, HAS_SINKS=sinks is not None,
    )
    return out


# ------------------------------------------------------------------------------------------ the layer
def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                     sliding_window: int | None, softcap: float | None = None,
                     sinks: torch.Tensor | None = None) -> torch.Tensor:
    """The AttentionBackend of tprun/worker/layers/attention.py."""
    return paged_attention(q, k, v, k_cache, v_cache, meta, scale, sliding_window, softcap, sinks)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                    sliding_window: int | None = None, softcap: float | None = None,
                    sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Attention.forward's contract: store k/v [T, nkv, hd] at meta.slot_mapping, attend, -> [T, nh * hd]."""
    store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping)
    num_tokens, num_heads, head_dim = q.shape
    out = torch.empty(num_tokens, num_heads * head_dim, dtype=q.dtype, device=q.device)
    out3 = out.view(num_tokens, num_heads, head_dim)
    if meta.is_prefill:
        prefill_attention(q, k_cache, v_cache, meta, scale, out=out3, sliding_window=sliding_window,
                          softcap=softcap, sinks=sinks)
    else:
        decode_attention(q, k_cache, v_cache, meta.seq_lens, meta.block_tables, scale, out=out3,
                         sliding_window=sliding_window, softcap=softcap, sinks=sinks)
    return out
