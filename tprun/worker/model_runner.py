"""Runs the model for one scheduled step: builds the flat batch, owns the KV cache, samples."""

from __future__ import annotations

import torch

from tprun.worker.attention_metadata import AttentionMetadata
from tprun.worker.models import load_model
from tprun.worker.parallel import TPGroup
from tprun.worker.sampler import Sampler
from tprun.worker.step import StepInput

CPU_DEFAULT_KV_BYTES = 1 << 30


class ModelRunner:
    def __init__(self, model_dir: str, hf_config, tp: TPGroup, dtype: torch.dtype, device: torch.device,
                 block_size: int, max_model_len: int, max_num_batched_tokens: int, max_num_seqs: int) -> None:
        self.hf_config = hf_config
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.model = load_model(model_dir, hf_config, tp, dtype, device)
        self.sampler = Sampler(device)
        self.num_blocks = 0

    # -- KV cache ------------------------------------------------------------------------------
    def kv_block_bytes(self) -> int:
        layers = self.model.attention_layers
        a = layers[0]
        per_token = 2 * a.num_kv_heads * a.head_dim * torch.finfo(self.dtype).bits // 8
        return len(layers) * self.block_size * per_token

    def max_useful_blocks(self) -> int:
        per_seq = -(-self.max_model_len // self.block_size)
        return self.max_num_seqs * per_seq

    def kv_cache_budget(self, kv_cache_memory: int | None, gpu_memory_utilization: float) -> int:
        """Bytes this rank can give the KV cache (an explicit budget wins)."""
        if kv_cache_memory is not None:
            return kv_cache_memory
        if self.device.type != "cuda":
            return CPU_DEFAULT_KV_BYTES
        return self._profile_cuda_budget(gpu_memory_utilization)

    @torch.inference_mode()
    def _profile_cuda_budget(self, utilization: float) -> int:
        # A worst-case prefill without a cache shows the activation peak the cache must leave room for.
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        n = min(self.max_num_batched_tokens, self.max_model_len * self.max_num_seqs)
        lens = _split(n, self.max_model_len)
        meta = self._metadata([0] * len(lens), lens, [[] for _ in lens], is_prefill=True, slots=None)
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        pos = torch.cat([torch.arange(x, device=self.device) for x in lens])
        hidden = self.model(ids, pos, meta)
        self.model.compute_logits(hidden[: min(len(hidden), self.max_num_seqs)])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        allocated = torch.cuda.memory_allocated(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        used_by_others = total - free - torch.cuda.memory_reserved(self.device)
        torch.cuda.empty_cache()
        return int(total * utilization - used_by_others - allocated - (peak - allocated))

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        for layer in self.model.attention_layers:
            shape = (num_blocks, self.block_size, layer.num_kv_heads, layer.head_dim)
            layer.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            layer.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)

    # -- one step ------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, step: StepInput) -> list[int]:
        for seq_id in step.finished_seq_ids:
            self.sampler.release(seq_id)
        ids, pos, slots = [], [], []
        bs = self.block_size
        for s in step.seqs:
            ids.extend(s.new_token_ids)
            positions = range(s.start_pos, s.seq_len)
            pos.extend(positions)
            slots.extend(s.block_table[p // bs] * bs + p % bs for p in positions)
        meta = self._metadata([s.start_pos for s in step.seqs], [len(s.new_token_ids) for s in step.seqs],
                              [s.block_table for s in step.seqs], step.is_prefill, slots)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        positions = torch.tensor(pos, dtype=torch.long, device=self.device)
        hidden = self.model(input_ids, positions, meta)
        last = meta.cu_seqlens_q[1:].long() - 1
        logits = self.model.compute_logits(hidden[last])
        return self.sampler(logits, step.seqs)

    def _metadata(self, starts: list[int], query_lens: list[int], block_tables: list[list[int]],
                  is_prefill: bool, slots: list[int] | None) -> AttentionMetadata:
        dev = self.device
        seq_lens = [s + q for s, q in zip(starts, query_lens)]
        cu = [0]
        for q in query_lens:
            cu.append(cu[-1] + q)
        width = max((len(t) for t in block_tables), default=0) or 1
        tables = [t + [-1] * (width - len(t)) for t in block_tables]
        return AttentionMetadata(
            is_prefill=is_prefill,
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            slot_mapping=torch.tensor(slots if slots is not None else [], dtype=torch.long, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            query_lens_list=list(query_lens),
            seq_lens_list=seq_lens,
            block_size=self.block_size,
        )


def _split(total: int, most: int) -> list[int]:
    out = []
    while total > 0:
        out.append(min(total, most))
        total -= out[-1]
    return out
