"""What one forward step tells the attention layers about the batch (passed explicitly)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """A flat batch of T new tokens from B sequences.

    Sequence b owns query tokens [cu_seqlens_q[b], cu_seqlens_q[b+1]); its context after this step
    is seq_lens[b] tokens, of which the last (query_len) are new and the rest are already cached.
    """

    is_prefill: bool  # False: every sequence has exactly one new token (pure decode)
    cu_seqlens_q: torch.Tensor  # int32 [B+1], on the model's device
    seq_lens: torch.Tensor  # int32 [B], on the model's device
    slot_mapping: torch.Tensor  # int64 [T]: KV-cache slot (block * block_size + offset) per new token
    block_tables: torch.Tensor  # int32 [B, max_blocks], padded with -1
    query_lens_list: list[int]  # host copies, for backends that loop on the host
    seq_lens_list: list[int]
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_list)

    @property
    def max_seqlen_q(self) -> int:
        return max(self.query_lens_list, default=0)

    @property
    def max_seqlen_k(self) -> int:
        return max(self.seq_lens_list, default=0)
