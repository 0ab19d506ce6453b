"""How much of a GPU the KV cache may take: a worst-case prefill measured, decode scratch and the memory
the captured decode graphs keep estimated; out-of-memory at start-up turned into a clear error."""

from __future__ import annotations

import torch

# Driver-side memory of one instantiated graph, outside the caching allocator (a conservative few MiB).
_GRAPH_OVERHEAD_BYTES = 4 << 20


def raise_if_oom(e: BaseException, during: str, fix: str) -> None:
    """Running out of device memory `during` a start-up step becomes a clear error; the caller re-raises
    any other error as it is. The job runner turns either into this rank's failure, which stops every rank."""
    text = str(e)
    if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in text.lower():
        raise RuntimeError(f"out of GPU memory while {during}: {text.splitlines()[0] if text else e!r}; "
                           f"{fix}") from e


@torch.inference_mode()
def profile_cuda_budget(runner, utilization: float) -> int:
    """Bytes of this GPU the KV cache may take (before its cache exists)."""
    # A worst-case prefill without a cache shows the activation peak the cache must leave room for;
    # the logits and sampler buffers of a full decode batch come on top (float32, a few copies), and
    # so do the decode kernels' scratch and the memory the CUDA graphs keep (estimated, see below).
    torch.cuda.synchronize(runner.device)
    torch.cuda.reset_peak_memory_stats(runner.device)
    n = min(runner.max_num_batched_tokens, runner.max_model_len * runner.max_num_seqs)
    try:
        lens = _split(n, runner.max_model_len)
        meta = runner.metadata([0] * len(lens), lens, [[] for _ in lens], is_prefill=True, slots=None)
        ids = torch.zeros(n, dtype=torch.long, device=runner.device)
        pos = torch.cat([torch.arange(x, device=runner.device) for x in lens])
        hidden = runner.model(ids, pos, meta)
        runner.model.compute_logits(hidden[: min(len(hidden), runner.max_num_seqs)])
        torch.cuda.synchronize(runner.device)
    except RuntimeError as e:  # torch.cuda.OutOfMemoryError included
        raise_if_oom(e, f"profiling a worst-case prefill of {n} tokens (before the KV cache exists)",
                      "lower max_num_batched_tokens or max_model_len, or raise --tp")
        raise
    peak = torch.cuda.max_memory_allocated(runner.device)
    allocated = torch.cuda.memory_allocated(runner.device)
    free, total = torch.cuda.mem_get_info(runner.device)
    used_by_others = total - free - torch.cuda.memory_reserved(runner.device)
    torch.cuda.empty_cache()
    sampler_bytes = 4 * runner.max_num_seqs * runner.hf_config.vocab_size * 4
    activations_per_token = (peak - allocated) / max(n, 1)
    # Captured graphs own their decode scratch; eager decode needs it transiently.
    decode_bytes = graph_bytes(runner, activations_per_token) or decode_scratch_bytes(runner)
    return int(total * utilization - used_by_others - allocated - (peak - allocated) - sampler_bytes
               - decode_bytes)


def decode_scratch_bytes(runner) -> int:
    """Split-KV decode attention's float32 partials for a full batch at max_model_len (one layer at a
    time; the prefill profile never runs the decode kernels)."""
    a = runner.model.attention_layers[0]
    parts = -(-runner.max_model_len // 256)  # the narrowest decode partition (attention_cuda.py)
    return runner.max_num_seqs * a.num_heads * parts * (a.head_dim + 1) * 4


def graph_bytes(runner, activations_per_token: float) -> int:
    """What captured decode graphs keep for the life of the engine: the static inputs, the shared
    pool's activations and scratch of the largest batch, each graph's logits, and per-graph overhead."""
    if runner.enforce_eager or not runner.graphs_supported():
        return 0
    from tprun.worker.model_runner import graph_batch_sizes

    sizes = graph_batch_sizes(runner.max_num_seqs)
    top, max_blocks = sizes[-1], -(-runner.max_model_len // runner.block_size)
    static = top * (3 * 8 + 4) + top * max_blocks * 4 + (top + 1) * 4
    logits = sum(sizes) * runner.hf_config.vocab_size * max(4, torch.finfo(runner.dtype).bits // 8)
    return int(static + activations_per_token * top + decode_scratch_bytes(runner) + logits
               + _GRAPH_OVERHEAD_BYTES * len(sizes))


def _split(total: int, most: int) -> list[int]:
    out = []
    while total > 0:
        out.append(min(total, most))
        total -= out[-1]
    return out
