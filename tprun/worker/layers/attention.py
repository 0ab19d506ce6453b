"""Paged attention over the KV cache, with a readable torch reference implementation.

The cache of each layer is two tensors [num_blocks, block_size, num_kv_heads, head_dim]; token t of a
sequence lives in slot block_table[t // block_size] * block_size + t % block_size. The model runner
allocates the caches and sets Attention.k_cache / v_cache; until then (the profiling run) attention is
computed over the new tokens alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tprun.worker.attention_metadata import AttentionMetadata
from tprun.worker.layers.sharding import CheckpointTensor, load_shard, new_param

# (q [T, nh, hd], k [T, nkv, hd], v, k_cache or None, v_cache or None, meta, scale, sliding_window,
#  softcap=None, sinks=None) -> [T, nh, hd]
AttentionBackend = Callable[..., torch.Tensor]


class Attention(nn.Module):
    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, sliding_window: int | None = None,
        *, softcap: float | None = None, sinks_total_heads: int | None = None, first_head: int = 0
    ):
        super().__init__()
        self.num_heads = num_heads  # per rank
        self.num_kv_heads = num_kv_heads  # per rank, after replication
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window  # a query sees only the last `sliding_window` keys (Mistral)
        self.softcap = softcap  # scores -> softcap * tanh(scores / softcap) (Gemma 2)
        # gpt-oss: one learned logit per query head that joins every softmax and is then dropped, split
        # over ranks with the query heads (this rank's are first_head .. first_head + num_heads).
        self.sinks_total_heads = sinks_total_heads
        self.first_head = first_head
        self.sinks = new_param(num_heads) if sinks_total_heads is not None else None
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    @property
    def needs_reference(self) -> bool:
        """Features the Triton kernels (attention_cuda.py) do not implement: none since they do soft-capping
        and sinks (tests/test_attention_cuda.py checks both against the reference). The model runner captures
        CUDA graphs only when no layer needs the reference."""
        return False

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q [T, nh, hd], k and v [T, nkv, hd] for the T new tokens -> [T, nh * hd]."""
        backend = select_backend(q, self.k_cache)
        out = backend(q, k, v, self.k_cache, self.v_cache, meta, self.scale, self.sliding_window,
                      softcap=self.softcap, sinks=self.sinks)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)

    def weight_loader(self, param: nn.Parameter, loaded: CheckpointTensor, shard_id: None = None) -> None:
        """The sinks, split by query head as q_proj is."""
        load_shard(param.data, loaded, dim=0, start=self.first_head, full_len=self.sinks_total_heads)


def select_backend(q: torch.Tensor, k_cache: torch.Tensor | None) -> AttentionBackend:
    """The one place that chooses how attention is computed. Each backend stores the new K/V itself.

    CUDA with a cache: the Triton paged kernels (tprun/worker/layers/attention_cuda.py), unless the head
    size or dtype is one they don't handle. The profiling run (no cache yet) and the CPU: the reference.
    """
    if q.device.type == "cuda" and k_cache is not None:
        from tprun.worker.layers import attention_cuda

        if attention_cuda.unsupported_reason(q.shape[-1], q.dtype) is None:
            return attention_cuda.triton_attention
    return reference_attention


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    k_cache.view(-1, *k.shape[1:])[slot_mapping] = k
    v_cache.view(-1, *v.shape[1:])[slot_mapping] = v


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor | None,
    v_cache: torch.Tensor | None,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """One SDPA call per sequence: its new queries against its whole context (cached + new); with
    soft-capping or sinks, the same in plain torch ops (eager_attention)."""
    eager = softcap is not None or sinks is not None
    if k_cache is not None:
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    out = torch.empty_like(q)
    start = 0
    for b, (query_len, seq_len) in enumerate(zip(meta.query_lens_list, meta.seq_lens_list, strict=True)):
        end = start + query_len
        if k_cache is None:  # no cache yet: the new tokens are the whole context
            seq_len = query_len
            keys, values = k[start:end], v[start:end]
        else:
            keys = gather_context(k_cache, meta.block_tables[b], seq_len)
            values = gather_context(v_cache, meta.block_tables[b], seq_len)
        mask = causal_mask(query_len, seq_len, sliding_window, q.device)
        if eager:
            out[start:end] = eager_attention(q[start:end], keys, values, mask, scale, softcap, sinks)
            start = end
            continue
        out[start:end] = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1),
            keys.transpose(0, 1),
            values.transpose(0, 1),
            attn_mask=mask,
            scale=scale,
            enable_gqa=keys.shape[1] != q.shape[1],
        ).transpose(0, 1)
        start = end
    return out


def eager_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor, scale: float,
    softcap: float | None, sinks: torch.Tensor | None,
) -> torch.Tensor:
    """q [L, nh, hd] against keys/values [S, nkv, hd] -> [L, nh, hd], in transformers' eager order of
    operations (Gemma 2's soft-capping, gpt-oss's sinks), so float64 runs agree with it to rounding error.

    The softmax runs in the activations' dtype, at least float32. transformers' Gemma 2 rounds it to float32 even in float64 runs, which makes its own cached and uncached
    logits differ by ~1e-7; the float64 tests give it a float64 softmax instead (tests/model_harness.py)."""
    groups = q.shape[1] // keys.shape[1]
    k = keys.transpose(0, 1).repeat_interleave(groups, dim=0)  # [nh, S, hd]
    v = values.transpose(0, 1).repeat_interleave(groups, dim=0)
    scores = torch.matmul(q.transpose(0, 1), k.transpose(1, 2)) * scale  # [nh, L, S]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed, float("-inf"))
    softmax_dtype = torch.promote_types(scores.dtype, torch.float32)
    if sinks is not None:
        sink = sinks.to(scores.dtype).reshape(-1, 1, 1).expand(-1, scores.shape[1], 1)
        combined = torch.cat([scores, sink], dim=-1)
        combined = combined - combined.max(dim=-1, keepdim=True).values
        probs = F.softmax(combined, dim=-1, dtype=softmax_dtype)[..., :-1]
    else:
        probs = F.softmax(scores, dim=-1, dtype=softmax_dtype)
    return torch.matmul(probs.to(v.dtype), v).transpose(0, 1)


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first seq_len tokens of one sequence from the paged cache: [seq_len, nkv, hd]."""
    block_size = cache.shape[1]
    blocks = block_table[: -(-seq_len // block_size)]
    return cache[blocks].flatten(0, 1)[:seq_len]


def causal_mask(query_len: int, seq_len: int, sliding_window: int | None, device: torch.device) -> torch.Tensor:
    """[query_len, seq_len] bool, True where attention is allowed.

    The queries are the last query_len tokens of the context, so query i sits at position
    seq_len - query_len + i and sees keys up to and including that position (and, with a sliding
    window, only the last `sliding_window` of them, as transformers' Mistral does).
    """
    query_pos = torch.arange(seq_len - query_len, seq_len, device=device)[:, None]
    key_pos = torch.arange(seq_len, device=device)[None, :]
    allowed = key_pos <= query_pos
    if sliding_window is not None:
        allowed &= key_pos > query_pos - sliding_window
    return allowed
