"""The device's ceilings, measured in the same run, and the floor of a workload (../shared/BENCH.md).

Bandwidth B: a large device-to-device copy, bytes read + written over time. Peak P: an 8192^3 bf16
matmul on random data (on CPU a smaller float32 one, so CI-sized runs finish). Floor = max(total FLOPs / P,
(max_output_len * weight_bytes + KV bytes read by decode) / B).

Mixture-of-Experts shapes count what a step touches instead: FLOPs of the active parameters (attention,
router, the k routed experts), and per step the dense weights (attention, norms, routers, embeddings) plus
the experts that the step's tokens route to. With random routers routing is close to uniform, so a step of
batch b touches E * (1 - (1 - k/E)^b) experts per layer in expectation (8 of 128 at batch 1, nearly all at
256); step j's batch is the number of requests with more than j output tokens (all requests run at once).

The serial floor is what a schedule reaches whose kernels run one after another at the ceilings: every
prompt token's FLOPs at P, then each decode step's GEMMs at max(FLOPs / P, weight bytes / B) followed by
its attention's K/V bytes / B. The floor above assumes instead that compute and memory traffic overlap
perfectly (prefill under decode, attention under GEMMs); no engine that runs a step's kernels in sequence
can beat the serial floor, so it says how much of the floor is within reach of kernel work alone.

    python benchmarks/roofline.py [--device cuda|cpu]     # prints the ceilings as JSON
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch


def time_median(fn: Callable[[], object], device: torch.device, warmup: int = 3, reps: int = 10) -> float:
    """Median seconds of fn, timed with device events on CUDA (the work is asynchronous)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def graph_us(fn: Callable[[], object], replays: int = 20) -> float:
    """GPU microseconds of one call of fn, from replays of a CUDA graph of it: no launch gap or timing event
    between its kernels but the graph's (fn must never sync the host)."""
    fn()  # compiles the kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / replays


@dataclass
class Ceilings:
    device_name: str
    bandwidth: float  # bytes/s, read + written
    matmul_flops: float  # FLOP/s
    matmul_shape: str


def copy_bandwidth(device: torch.device) -> float:
    n_bytes = (2 << 30) if device.type == "cuda" else (256 << 20)  # far past the L2 / last-level cache
    src = torch.randn(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * n_bytes / time_median(lambda: dst.copy_(src), device)


def matmul_rate(device: torch.device, n: int, dtype: torch.dtype) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / time_median(lambda: a @ b, device)


def measure_ceilings(device: torch.device) -> Ceilings:
    cuda = device.type == "cuda"
    n, dtype = (8192, torch.bfloat16) if cuda else (1024, torch.float32)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    return Ceilings(name, copy_bandwidth(device), matmul_rate(device, n, dtype),
                    f"{n}^3 {str(dtype).removeprefix('torch.')}")


@dataclass
class ModelCost:
    params: int
    weight_bytes: int
    kv_bytes_per_token: int  # layers * kv_heads * head_dim * 2 (K and V) * dtype bytes
    # Mixture of Experts (0 for dense models): what a step touches depends on its batch (step_weight_bytes).
    active_params: int = 0  # per token: everything but the experts, plus k experts per sparse layer
    moe_layers: int = 0
    num_experts: int = 0
    experts_per_token: int = 0
    expert_bytes: int = 0  # one expert of one layer (gate, up, down)


def model_cost(config, dtype_bytes: int) -> ModelCost:
    """Parameter count and KV bytes per token from an HF config of the Llama family or Qwen3-MoE."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    nh, nkv = config.num_attention_heads, config.num_key_value_heads
    hd = getattr(config, "head_dim", None) or h // nh
    attn = h * nh * hd + 2 * h * nkv * hd + nh * hd * h + 2 * h
    if getattr(config, "attention_bias", False):
        attn += nh * hd + 2 * nkv * hd
    if config.model_type in ("qwen3", "qwen3_moe"):
        attn += 2 * hd  # q_norm, k_norm
    embed = config.vocab_size * h
    outer = h + embed * (1 if config.tie_word_embeddings else 2)
    kv = layers * nkv * hd * 2 * dtype_bytes
    if config.model_type != "qwen3_moe":
        params = layers * (attn + 3 * h * inter) + outer
        return ModelCost(params, params * dtype_bytes, kv)
    sparse = [i not in (config.mlp_only_layers or []) and (i + 1) % config.decoder_sparse_step == 0
              for i in range(layers)]
    moe_layers = sum(sparse)
    e, k, expert = config.num_experts, config.num_experts_per_tok, 3 * h * config.moe_intermediate_size
    dense = layers * attn + (layers - moe_layers) * 3 * h * inter + moe_layers * h * e + outer
    params = dense + moe_layers * e * expert
    return ModelCost(params, params * dtype_bytes, kv, dense + moe_layers * k * expert, moe_layers, e, k,
                     expert * dtype_bytes)


def step_weight_bytes(cost: ModelCost, batch: int) -> float:
    """Weight bytes one forward step of `batch` tokens reads: all of them for a dense model; for MoE the
    dense part and the expected number of distinct experts its tokens route to (uniform routing)."""
    if not cost.moe_layers:
        return cost.weight_bytes
    e, k = cost.num_experts, cost.experts_per_token
    touched = e * (1 - (1 - k / e) ** batch)
    all_experts = cost.moe_layers * e * cost.expert_bytes
    return cost.weight_bytes - all_experts + cost.moe_layers * touched * cost.expert_bytes


def decode_kv_bytes(requests: list[tuple[int, int]], kv_bytes_per_token: int) -> int:
    """KV bytes the decode steps must read: output token j >= 2 of a request reads prompt + j - 1 tokens."""
    tokens = sum((o - 1) * p + (o - 1) * o // 2 for p, o in requests)
    return tokens * kv_bytes_per_token


@dataclass
class Floor:
    seconds: float
    compute_s: float
    memory_s: float
    total_flops: float
    memory_bytes: float


def floor(cost: ModelCost, requests: list[tuple[int, int]], ceilings: Ceilings, num_devices: int = 1) -> Floor:
    """BENCH.md's floor for requests [(prompt_len, output_len)]; num_devices multiplies both ceilings."""
    total_tokens = sum(p + o for p, o in requests)
    flops = 2 * (cost.active_params or cost.params) * total_tokens
    max_out = max(o for _, o in requests)
    if cost.moe_layers:  # step j runs the requests with more than j output tokens
        outs = [o for _, o in requests]
        weights = sum(step_weight_bytes(cost, sum(o > j for o in outs)) for j in range(max_out))
    else:
        weights = max_out * cost.weight_bytes
    mem = weights + decode_kv_bytes(requests, cost.kv_bytes_per_token)
    compute_s = flops / (ceilings.matmul_flops * num_devices)
    memory_s = mem / (ceilings.bandwidth * num_devices)
    return Floor(max(compute_s, memory_s), compute_s, memory_s, flops, mem)


def serial_floor(cost: ModelCost, requests: list[tuple[int, int]], ceilings: Ceilings,
                 num_devices: int = 1) -> float:
    """Seconds of the serial floor (module docstring) for requests [(prompt_len, output_len)]."""
    rate, bw = ceilings.matmul_flops * num_devices, ceilings.bandwidth * num_devices
    params = cost.active_params or cost.params
    seconds = 2 * params * sum(p for p, _ in requests) / rate
    for j in range(1, max(o for _, o in requests)):  # decode step j: requests with more than j outputs
        live = [p + j for p, o in requests if o > j]
        seconds += max(2 * params * len(live) / rate, step_weight_bytes(cost, len(live)) / bw)
        seconds += sum(live) * cost.kv_bytes_per_token / bw
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    c = measure_ceilings(torch.device(args.device))
    print(json.dumps(asdict(c) | {"bandwidth_TBps": c.bandwidth / 1e12, "matmul_TFLOPs": c.matmul_flops / 1e12}))


if __name__ == "__main__":
    main()
