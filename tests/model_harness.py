"""Drive a tprun model through a paged KV cache step by step, and compute the HF transformers reference.

Shared by tests/test_models.py (TP=1, in process) and tests/model_tp_check.py (TP=2 under torchrun).
"""

from __future__ import annotations

import torch
from torch import nn

from tprun.worker.attention_metadata import AttentionMetadata


class PagedRun:
    """A model with a KV cache allocated here (as the model runner does), fed sequences step by step."""

    def __init__(self, model: nn.Module, block_size: int = 4, num_blocks: int = 64, with_cache: bool = True):
        self.model = model
        self.block_size = block_size
        weight = next(model.parameters())
        self.device = weight.device
        if with_cache:
            for layer in model.attention_layers:
                shape = (num_blocks, block_size, layer.num_kv_heads, layer.head_dim)
                layer.k_cache = torch.zeros(shape, dtype=weight.dtype, device=self.device)
                layer.v_cache = torch.zeros(shape, dtype=weight.dtype, device=self.device)
        # Hand blocks out in a scrambled order, so block tables are neither contiguous nor sorted.
        self.free_blocks = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0)).tolist()
        self.lengths: dict[int, int] = {}
        self.blocks: dict[int, list[int]] = {}

    def step(self, new_tokens: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        """Feed each sequence its new tokens in one batch; returns each sequence's logits [new, vocab]."""
        ids, positions, slots, tables, query_lens, seq_lens = [], [], [], [], [], []
        for seq, tokens in new_tokens.items():
            start = self.lengths.get(seq, 0)
            blocks = self.blocks.setdefault(seq, [])
            for pos in range(start, start + len(tokens)):
                if pos // self.block_size == len(blocks):
                    blocks.append(self.free_blocks.pop())
                slots.append(blocks[pos // self.block_size] * self.block_size + pos % self.block_size)
            ids += tokens
            positions += range(start, start + len(tokens))
            self.lengths[seq] = start + len(tokens)
            tables.append(blocks)
            query_lens.append(len(tokens))
            seq_lens.append(self.lengths[seq])
        width = max(len(t) for t in tables)
        cu = [0]
        for n in query_lens:
            cu.append(cu[-1] + n)
        dev = self.device
        padded_tables = [t + [-1] * (width - len(t)) for t in tables]
        meta = AttentionMetadata(
            is_prefill=any(n != 1 for n in query_lens),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(padded_tables, dtype=torch.int32, device=dev),
            query_lens_list=query_lens,
            seq_lens_list=seq_lens,
            block_size=self.block_size,
        )
        with torch.no_grad():
            hidden = self.model(torch.tensor(ids, device=dev), torch.tensor(positions, device=dev), meta)
            logits = self.model.compute_logits(hidden)
        return dict(zip(new_tokens, logits.split(query_lens), strict=True))


def paged_logits(model: nn.Module, seqs: list[list[int]]) -> list[torch.Tensor]:
    """Logits of every position of three sequences fed the way a continuous-batching engine feeds them.

    Step 1 prefills the first two sequences' prompts together; step 2 mixes a decode (seq 0), a chunked
    prefill continuation (seq 1) and a new prefill (seq 2); then all decode one token per step.
    """
    assert len(seqs) == 3 and all(len(s) >= 8 for s in seqs)
    run = PagedRun(model)
    fed = [0, 0, 0]
    out: list[list[torch.Tensor]] = [[], [], []]

    def feed(counts: dict[int, int]) -> None:
        new = {i: seqs[i][fed[i] : fed[i] + n] for i, n in counts.items() if n}
        for i, logits in run.step(new).items():
            out[i].append(logits)
            fed[i] += len(new[i])

    feed({0: 5, 1: 4})
    feed({0: 1, 1: 3, 2: 4})
    while any(fed[i] < len(seqs[i]) for i in range(3)):
        feed({i: 1 for i in range(3) if fed[i] < len(seqs[i])})
    return [torch.cat(parts) for parts in out]


def prefill_logits_without_cache(model: nn.Module, seqs: list[list[int]]) -> list[torch.Tensor]:
    """One batched prefill before any KV cache exists (the model runner's profiling run)."""
    run = PagedRun(model, with_cache=False)
    logits = run.step(dict(enumerate(seqs)))
    return [logits[i] for i in range(len(seqs))]


def hf_logits(hf_model: nn.Module, seq: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([seq])).logits[0]


def sequences(vocab_size: int, lengths: tuple[int, ...] = (13, 9, 11), seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=gen).tolist() for n in lengths]
