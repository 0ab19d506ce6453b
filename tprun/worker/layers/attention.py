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

# (q [T, nh, hd], k [T, nkv, hd], v, k_cache or None, v_cache or None, meta, scale, sliding_window) -> [T, nh, hd]
AttentionBackend = Callable[..., torch.Tensor]


class Attention(nn.Module):
    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, sliding_window: int | None = None
    ):
        super().__init__()
        self.num_heads = num_heads  # per rank
        self.num_kv_heads = num_kv_heads  # per rank, after replication
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window  # a query sees only the last `sliding_window` keys (Mistral)
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q [T, nh, hd], k and v [T, nkv, hd] for the T new tokens -> [T, nh * hd]."""
        backend = select_backend(q, self.k_cache)
        out = backend(q, k, v, self.k_cache, self.v_cache, meta, self.scale, self.sliding_window)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)


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
) -> torch.Tensor:
    """One SDPA call per sequence: its new queries against its whole context (cached + new)."""
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
