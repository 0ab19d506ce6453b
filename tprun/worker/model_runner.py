"""Runs the model for one scheduled step: builds the flat batch, owns the KV cache, samples.

On CUDA the step's inputs go up through pinned memory with non-blocking copies, and decode steps replay
CUDA graphs captured once per batch size (after the KV cache exists), padded up to the next captured
size: padding rows have slot -1 (nothing stored) and context length 0 (nothing read).
"""

from __future__ import annotations

import numpy as np
import torch

from tprun.worker.attention_metadata import AttentionMetadata
from tprun.worker.memory_budget import profile_cuda_budget, raise_if_oom
from tprun.worker.models import load_model
from tprun.worker.parallel import TPGroup
from tprun.worker.sampled_step import SampledStep
from tprun.worker.sampler import Sampler
from tprun.worker.step import SeqStep, StepInput

CPU_DEFAULT_KV_BYTES = 1 << 30


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """Captured decode batch sizes: 1, 2, 4, 8, then every 16 (a step pads up to the next captured size)."""
    sizes = [s for s in (1, 2, 4, 8, *range(16, max_num_seqs, 16)) if s < max_num_seqs]
    return [*sizes, max_num_seqs]


class ModelRunner:
    def __init__(self, model_dir: str, hf_config, tp: TPGroup, dtype: torch.dtype, device: torch.device,
                 block_size: int, max_model_len: int, max_num_batched_tokens: int, max_num_seqs: int,
                 enforce_eager: bool = False) -> None:
        self.hf_config = hf_config
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.enforce_eager = enforce_eager
        self.model = load_model(model_dir, hf_config, tp, dtype, device)
        self.sampler = Sampler(device)
        self.num_blocks = 0
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._last_tokens: torch.Tensor | None = None  # the last step's sampled tokens, on the device

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
        return profile_cuda_budget(self, gpu_memory_utilization)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        try:
            for layer in self.model.attention_layers:
                shape = (num_blocks, self.block_size, layer.num_kv_heads, layer.head_dim)
                layer.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
                layer.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        except RuntimeError as e:  # torch.cuda.OutOfMemoryError included
            raise_if_oom(e, f"allocating the KV cache ({num_blocks} blocks of {self.kv_block_bytes()} bytes)",
                          "lower gpu_memory_utilization or set kv_cache_memory")
            raise
        if self.device.type == "cuda" and not self.enforce_eager and self.graphs_supported():
            try:
                self.capture_decode_graphs()
            except RuntimeError as e:  # torch.cuda.OutOfMemoryError included
                self.graphs.clear()
                raise_if_oom(e, f"capturing CUDA graphs for decode batches of up to {self.max_num_seqs}",
                              "lower gpu_memory_utilization or max_num_seqs, set kv_cache_memory, or set "
                              "enforce_eager=true (no graphs)")
                raise

    def graphs_supported(self) -> bool:
        from tprun.worker.layers.attention_cuda import unsupported_reason

        a = self.model.attention_layers[0]
        # Soft-capping and sinks (Gemma 2, gpt-oss) run in the torch reference, which cannot be captured.
        reference = any(layer.needs_reference for layer in self.model.attention_layers)
        return unsupported_reason(a.head_dim, self.dtype) is None and not reference

    # -- one step ------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, step: StepInput) -> SampledStep:
        """Launch the step; its tokens stay on the device, where the next step may read them."""
        prompt_logits: list[torch.Tensor | None] = []
        logits = self.compute_logits(step, prompt_logits)
        sampled = self.sampler(logits, step, prompt_logits)
        self._last_tokens = sampled.tokens
        return sampled

    def _fill_from_previous(self, ids: torch.Tensor, seqs: list[SeqStep], row_starts: list[int]) -> None:
        """Scheduling ahead: a row whose last token the previous step sampled reads it on the device."""
        dst, src = [], []
        for s, start in zip(seqs, row_starts):
            if s.prev_row >= 0:
                dst.append(start + len(s.new_token_ids) - 1)
                src.append(s.prev_row)
        if dst:
            if self._last_tokens is None:
                raise RuntimeError("a step reads the previous step's tokens but none ran (a bug)")
            ids[self._upload(dst, torch.long)] = self._last_tokens[self._upload(src, torch.long)]

    @torch.inference_mode()
    def compute_logits(self, step: StepInput, prompt_logits: list | None = None) -> torch.Tensor:
        """[len(step.seqs), vocab]: each sequence's next-token logits after this step. For sequences that
        ask for prompt logprobs, `prompt_logits` receives the logits of every prompt position this step
        computes that predicts another prompt token (None for the others)."""
        if not step.is_prefill and self.graphs and len(step.seqs) <= max(self.graphs):
            return self._replay_decode(step.seqs)
        ids, pos, slots, starts = [], [], [], []
        bs = self.block_size
        for s in step.seqs:
            starts.append(len(ids))  # where its new tokens begin in the flat batch
            ids.extend(s.new_token_ids)
            positions = range(s.start_pos, s.seq_len)
            pos.extend(positions)
            slots.extend(s.block_table[p // bs] * bs + p % bs for p in positions)
        meta = self.metadata([s.start_pos for s in step.seqs], [len(s.new_token_ids) for s in step.seqs],
                              [s.block_table for s in step.seqs], step.is_prefill, slots)
        ids = self._upload(ids, torch.long)
        self._fill_from_previous(ids, step.seqs, starts)
        hidden = self.model(ids, self._upload(pos, torch.long), meta)
        last = meta.cu_seqlens_q[1:].long() - 1
        if prompt_logits is not None:
            prompt_logits.extend(self._prompt_logits(step, hidden, starts))
        return self.model.compute_logits(hidden[last])

    def _prompt_logits(self, step: StepInput, hidden: torch.Tensor, starts: list[int]) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = []
        for s, offset in zip(step.seqs, starts):
            # Position p predicts prompt token p + 1: the last prompt position predicts an output token.
            count = min(s.seq_len, len(s.prompt_token_ids) - 1) - s.start_pos
            out.append(self.model.compute_logits(hidden[offset: offset + count])
                       if s.wants_prompt_logprobs and count > 0 else None)
        return out

    def _upload(self, values, dtype: torch.dtype) -> torch.Tensor:
        """Host data to the device; on CUDA through pinned memory, without waiting for the copy."""
        if self.device.type != "cuda":
            return torch.tensor(values, dtype=dtype, device=self.device)
        host = torch.from_numpy(values) if isinstance(values, np.ndarray) else torch.tensor(values, dtype=dtype)
        return host.pin_memory().to(self.device, non_blocking=True)

    def metadata(self, starts: list[int], query_lens: list[int], block_tables: list[list[int]],
                  is_prefill: bool, slots: list[int] | None) -> AttentionMetadata:
        seq_lens = [s + q for s, q in zip(starts, query_lens)]
        cu = [0]
        for q in query_lens:
            cu.append(cu[-1] + q)
        return AttentionMetadata(
            is_prefill=is_prefill,
            cu_seqlens_q=self._upload(cu, torch.int32),
            seq_lens=self._upload(seq_lens, torch.int32),
            slot_mapping=self._upload(slots if slots is not None else [], torch.long),
            block_tables=self._upload(_padded_tables(block_tables, len(block_tables)), torch.int32),
            query_lens_list=list(query_lens),
            seq_lens_list=seq_lens,
            block_size=self.block_size,
        )

    # -- CUDA graphs for decode ----------------------------------------------------------------
    @torch.inference_mode()
    def capture_decode_graphs(self) -> None:
        sizes = graph_batch_sizes(self.max_num_seqs)
        top = sizes[-1]
        max_blocks = -(-self.max_model_len // self.block_size)
        dev = self.device
        # Static inputs every graph reads; a replay writes the step's values into their first rows.
        self._g_ids = torch.zeros(top, dtype=torch.long, device=dev)
        self._g_pos = torch.zeros(top, dtype=torch.long, device=dev)
        self._g_slots = torch.full((top,), -1, dtype=torch.long, device=dev)
        self._g_seq_lens = torch.zeros(top, dtype=torch.int32, device=dev)
        self._g_tables = torch.zeros((top, max_blocks), dtype=torch.int32, device=dev)
        self._g_cu = torch.arange(top + 1, dtype=torch.int32, device=dev)
        pool = None
        for bs in reversed(sizes):  # largest first, so the smaller graphs fit in its memory pool
            meta = AttentionMetadata(False, self._g_cu[: bs + 1], self._g_seq_lens[:bs], self._g_slots[:bs],
                                     self._g_tables[:bs], [1] * bs, [1] * bs, self.block_size)
            self._decode_logits(bs, meta)  # compiles kernels and picks GEMM algorithms outside the capture
            torch.cuda.synchronize(dev)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._decode_logits(bs, meta)
            pool = graph.pool()
            self.graphs[bs] = (graph, logits)
        torch.cuda.synchronize(dev)

    def _decode_logits(self, bs: int, meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.model(self._g_ids[:bs], self._g_pos[:bs], meta)
        return self.model.compute_logits(hidden)

    def _replay_decode(self, seqs: list[SeqStep]) -> torch.Tensor:
        n = len(seqs)
        bs = min(size for size in self.graphs if size >= n)
        pad = bs - n
        block = self.block_size
        pos = [s.start_pos for s in seqs]
        slots = [s.block_table[p // block] * block + p % block for s, p in zip(seqs, pos)]
        tables = _padded_tables([s.block_table for s in seqs], bs)
        self._g_ids[:bs].copy_(self._upload([s.new_token_ids[0] for s in seqs] + [0] * pad, torch.long),
                               non_blocking=True)
        self._fill_from_previous(self._g_ids, seqs, range(n))
        self._g_pos[:bs].copy_(self._upload(pos + [0] * pad, torch.long), non_blocking=True)
        self._g_slots[:bs].copy_(self._upload(slots + [-1] * pad, torch.long), non_blocking=True)
        self._g_seq_lens[:bs].copy_(self._upload([p + 1 for p in pos] + [0] * pad, torch.int32), non_blocking=True)
        # Columns past a row's own blocks keep stale entries: the kernels never read past seq_len.
        self._g_tables[:bs, : tables.shape[1]].copy_(self._upload(tables, torch.int32), non_blocking=True)
        graph, logits = self.graphs[bs]
        graph.replay()
        return logits[:n]


def _padded_tables(tables: list[list[int]], rows: int) -> np.ndarray:
    """int32 [rows, widest table], padded with -1 (rows beyond len(tables) are all padding)."""
    width = max((len(t) for t in tables), default=0) or 1
    out = np.full((rows, width), -1, dtype=np.int32)
    for i, t in enumerate(tables):
        out[i, : len(t)] = t
    return out
