"""The bench workload (../shared/BENCH.md) through tprun and through HF transformers `generate`, in one run.

Reports output and total tok/s, the floor from the ceilings measured in this run and the % of roofline,
the ratio to HF, batch-1 decode latency against its HBM bound, peak memory and KV blocks, as a table and
as JSON. One model shape per run:

    python benchmarks/throughput.py --shape llama3-8b --json out.json              # GPU, full workload
    python benchmarks/throughput.py --device cpu --shape small --tp 1              # CPU, scaled down
    torchrun --nproc-per-node 2 benchmarks/throughput.py --device cpu --shape small --tp 2

HF runs on the first --hf-requests requests only (each static batch of the full workload costs about the
same), which keeps the GPU run within minutes; its tok/s is over those requests, and the ratio compares
tok/s. Every rank runs tprun; then rank 0 alone runs HF, after the others have left.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
from hf_baseline import hf_generate, load_hf_model  # noqa: E402
from models import SHAPES, rank_model  # noqa: E402
from roofline import floor, measure_ceilings, model_cost, serial_floor, step_weight_bytes  # noqa: E402
from workload import Request, bench_requests  # noqa: E402

CPU_DEFAULTS = {"num_requests": 16, "input_len": (16, 96), "output_len": (16, 96), "hf_requests": 16,
                "hf_batch_size": 8, "dtype": "float32", "batch1_tokens": 32}
GPU_DEFAULTS = {"num_requests": 256, "input_len": (100, 1024), "output_len": (100, 1024), "hf_requests": 64,
                "hf_batch_size": 64, "dtype": "bfloat16", "batch1_tokens": 256}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None)
    p.add_argument("--tp", type=int, default=int(os.environ.get("WORLD_SIZE", "1")))
    p.add_argument("--num-requests", type=int)
    p.add_argument("--input-len", type=int, nargs=2)
    p.add_argument("--output-len", type=int, nargs=2)
    p.add_argument("--hf-requests", type=int, help="requests HF runs (0: skip HF)")
    p.add_argument("--hf-batch-size", type=int)
    p.add_argument("--hf-max-tokens", type=int, help="cap HF's output lengths (a model too slow under HF for the "
                   "whole workload: qwen3-30b-a3b); its tok/s is over the capped tokens")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--batch1-tokens", type=int, help="decode steps timed at batch 1 (0: skip)")
    p.add_argument("--model-root", default=os.environ.get("TPRUN_BENCH_MODELS", "/tmp/tprun-bench-models"))
    p.add_argument("--json", help="write the result here (rank 0)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--profile", action="store_true", help="print the top GPU kernels of a decode-heavy run")
    p.add_argument("--profile-tokens", type=int, default=64,
                   help="output tokens per request of the profiled run (1: prefill alone)")
    p.add_argument("--cprofile", action="store_true", help="print the host-side Python hot spots of that run")
    names = [f"{v}{s}" for v in ("greedy", "sampled", "json", "logprobs") for s in ("", "-sync")]
    p.add_argument("--variants", nargs="*", default=[], choices=names,
                   help="also time these variants of the workload on the same engine (benchmarks/variants.py)")
    args = p.parse_args()
    defaults = GPU_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.shape = args.shape or ("llama3-8b" if args.device == "cuda" else "small")
    return args


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_tprun(args, model_dir: Path, requests: list[Request]) -> dict:
    from tprun import LLM, SamplingParams

    max_len = args.input_len[1] + args.output_len[1] + 16
    t0 = time.perf_counter()
    llm = LLM(model=str(model_dir), tensor_parallel_size=args.tp, dtype=args.dtype, seed=0, device=args.device,
              max_model_len=max_len, enforce_eager=args.enforce_eager)
    init_s = time.perf_counter() - t0
    greedy = [SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True) for r in requests]
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    # Warm-up: kernel compilation for the shapes prefill and decode meet, outside the timed run.
    llm.generate(prompts[:8], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    # Prefill alone (one token each), to split the timed run into its prefill and decode parts.
    sync(args.device)
    t0 = time.perf_counter()
    llm.generate(prompts, [SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)] * len(prompts))
    sync(args.device)
    prefill_s = time.perf_counter() - t0
    # The prompts are unique, but the prefill-only run above just cached them all: the timed run must not
    # find them (the shared-prefix variant, benchmarks/shared_prefix.py, measures what caching saves).
    llm.llm_engine.scheduler.block_manager.reset_prefix_cache()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(args.device)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, greedy)
    sync(args.device)
    seconds = time.perf_counter() - t0
    short = [(i, len(o.outputs[0].token_ids), r.max_tokens) for i, (o, r) in enumerate(zip(outs, requests))
             if len(o.outputs[0].token_ids) != r.max_tokens]
    if short:
        raise RuntimeError(f"tprun returned the wrong number of tokens (index, got, asked): {short[:5]}")
    result = {"seconds": seconds, "prefill_seconds": prefill_s, "init_seconds": init_s, "kv_blocks": llm.llm_engine.num_blocks,
              "block_size": llm.config.block_size,
              "preemptions": llm.llm_engine.scheduler.num_preemptions}
    if args.device == "cuda":
        result["peak_memory_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    if args.batch1_tokens:
        result["batch1_ms_per_token"] = batch1_latency(llm, requests[0], args.batch1_tokens, args.device)
    if args.variants:
        from variants import run_variants

        result["variants"] = run_variants(llm, requests, args.variants, lambda: sync(args.device))
    runner = llm.llm_engine.executor.worker.runner
    if runner.graphs:
        result["graph_replay"] = replay_cost(runner)
    if args.device == "cuda":
        result["decode_step_timing"] = step_timing(llm, prompts)
    if args.profile:
        profile_decode(llm, prompts, args.device, args.profile_tokens)
    if args.cprofile:
        cprofile_decode(llm, prompts)
    llm.shutdown()
    del llm
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return result


def batch1_latency(llm, request: Request, steps: int, device: str) -> float:
    """ms per decoded token at batch 1: (time of 1 + steps tokens - time of 1 token) / steps, warm."""
    from tprun import SamplingParams

    prompt = [{"prompt_token_ids": request.prompt_token_ids}]

    def run(n: int) -> float:
        sync(device)
        t0 = time.perf_counter()
        llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
        sync(device)
        return time.perf_counter() - t0

    run(steps + 1)
    return min((run(steps + 1) - run(1)) / steps * 1e3 for _ in range(2))


def step_timing(llm, prompts: list[dict]) -> dict:
    """Decode steps of all prompts x 64 tokens: the wall time between step starts against the GPU time of
    each step's work (events around the runner's execute, which ends in the sampler's host sync). The
    difference is host time with the GPU idle: engine scheduling, step building, uploads, post-processing."""
    from tprun import SamplingParams

    runner = llm.llm_engine.executor.worker.runner
    execute, records = runner.execute, []

    def timed(step):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        out = execute(step)
        end.record()
        records.append((t0, start, end, step.is_prefill, len(step.seqs)))
        return out

    runner.execute = timed
    try:
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True))
        torch.cuda.synchronize()
    finally:
        del runner.execute  # the instance attribute; a bound method stored on it would keep a cycle alive
    wall = gpu = 0.0
    steps = 0
    for (t0, s, e, prefill, _), (t1, *_rest) in zip(records, records[1:]):
        if not prefill:
            wall += t1 - t0
            gpu += s.elapsed_time(e) / 1e3
            steps += 1
    return {"decode_steps": steps, "batch": max(r[4] for r in records), "wall_ms_per_step": 1e3 * wall / steps,
            "gpu_ms_per_step": 1e3 * gpu / steps, "host_idle_ms_per_step": 1e3 * (wall - gpu) / steps}


def replay_cost(runner) -> dict:
    """Host time of one replay() call of the largest decode graph next to its GPU time: while the host
    launches, the GPU waits (each step's sampled tokens are needed before the next launch)."""
    graph, _ = runner.graphs[max(runner.graphs)]
    host, device = [], []
    for _ in range(10):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        graph.replay()
        end.record()
        host.append(time.perf_counter() - t0)
        end.synchronize()
        device.append(start.elapsed_time(end) / 1e3)
    return {"batch": max(runner.graphs), "host_launch_ms": 1e3 * sorted(host)[5],
            "gpu_ms": 1e3 * sorted(device)[5]}


def profile_decode(llm, prompts: list[dict], device: str, tokens: int = 64) -> None:
    from torch.profiler import ProfilerActivity, profile

    from tprun import SamplingParams

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    llm.reset_prefix_cache()  # earlier runs cached these prompts
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        llm.generate(prompts, params)
        sync(device)
    wall = time.perf_counter() - t0
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    busy = sum(getattr(e, key) for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")) / 1e6
    print(f"profile: {len(prompts)} requests x {tokens} tokens, wall {wall:.2f} s, GPU kernels {busy:.2f} s", flush=True)
    print(events.table(sort_by=key, row_limit=30, max_name_column_width=90), flush=True)


def cprofile_decode(llm, prompts: list[dict]) -> None:
    """Where the host's time goes (tottime of the final .tolist() is the wait for the GPU)."""
    import cProfile
    import pstats

    from tprun import SamplingParams

    prof = cProfile.Profile()
    prof.enable()
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True))
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def run_hf(args, model_dir: Path, requests: list[Request]) -> dict:
    model = load_hf_model(str(model_dir), getattr(torch, args.dtype), args.device)
    pad = model.config.pad_token_id or 0
    warm = [Request(r.prompt_token_ids, 4) for r in requests[:2]]
    hf_generate(model, warm, 2, args.device, pad)
    result, _ = hf_generate(model, requests, args.hf_batch_size, args.device, pad)
    del model
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return asdict(result) | {"output_tok_s": result.output_tok_s, "total_tok_s": result.total_tok_s}


def main() -> None:
    args = parse_args()
    rank = int(os.environ.get("RANK", "0"))
    model_dir, dtype, config = rank_model(args, rank)
    requests = bench_requests(args.num_requests, config.vocab_size, tuple(args.input_len), tuple(args.output_len))
    ceilings = measure_ceilings(torch.device(args.device)) if rank == 0 else None
    tp = run_tprun(args, model_dir, requests)
    if rank != 0:
        return
    if args.device == "cuda":
        tp["memory_left_after_shutdown_GiB"] = torch.cuda.memory_allocated() / 2**30
    # After tprun: the other ranks have left, so nobody waits on rank 0 in a collective meanwhile.
    hf_requests = [Request(r.prompt_token_ids, min(r.max_tokens, args.hf_max_tokens or r.max_tokens))
                   for r in requests[: args.hf_requests]]
    hf = run_hf(args, model_dir, hf_requests) if args.hf_requests else None

    cost = model_cost(config, dtype.itemsize)
    devices = args.tp if args.device == "cuda" else 1  # CPU ranks share one machine's cores and memory
    lens = [(len(r.prompt_token_ids), r.max_tokens) for r in requests]
    fl = floor(cost, lens, ceilings, devices)
    out_tokens = sum(o for _, o in lens)
    total_tokens = out_tokens + sum(p for p, _ in lens)
    serial = serial_floor(cost, lens, ceilings, devices)
    tp |= {"output_tok_s": out_tokens / tp["seconds"], "total_tok_s": total_tokens / tp["seconds"],
           "roofline_pct": 100 * fl.seconds / tp["seconds"], "serial_floor_s": serial,
           "serial_floor_pct": 100 * serial / tp["seconds"]}
    if "batch1_ms_per_token" in tp:
        bound_ms = step_weight_bytes(cost, 1) / devices / ceilings.bandwidth * 1e3  # MoE: k experts a layer
        tp |= {"batch1_bound_ms": bound_ms, "batch1_hbm_pct": 100 * bound_ms / tp["batch1_ms_per_token"]}
    if hf is not None:
        hf_floor = floor(cost, [(len(r.prompt_token_ids), r.max_tokens) for r in hf_requests], ceilings, 1)
        hf["roofline_pct"] = 100 * hf_floor.seconds / hf["seconds"]
        hf["max_tokens_cap"] = args.hf_max_tokens
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": ceilings.device_name, "tp": args.tp, "shape": args.shape, "dtype": args.dtype,
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "workload": {"num_requests": len(requests), "input_len": args.input_len, "output_len": args.output_len,
                     "prompt_tokens": total_tokens - out_tokens, "output_tokens": out_tokens},
        "ceilings": asdict(ceilings), "model": asdict(cost), "floor": asdict(fl), "tprun": tp, "hf": hf,
        "ratio_output_tok_s": tp["output_tok_s"] / hf["output_tok_s"] if hf else None,
    }
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


def print_table(r: dict) -> None:
    c, f, t, h = r["ceilings"], r["floor"], r["tprun"], r["hf"]
    print(f"\n{r['shape']} {r['dtype']} tp={r['tp']} on {r['device']} ({r['date']})")
    print(f"ceilings: copy {c['bandwidth'] / 1e12:.3g} TB/s, matmul {c['matmul_flops'] / 1e12:.3g} TFLOP/s "
          f"({c['matmul_shape']}); floor {f['seconds']:.2f} s (compute {f['compute_s']:.2f}, memory "
          f"{f['memory_s']:.2f})")
    print(f"tprun: {t['seconds']:.2f} s  {t['output_tok_s']:.0f} out tok/s  {t['total_tok_s']:.0f} total tok/s  "
          f"{t['roofline_pct']:.1f}% of roofline ({t['serial_floor_pct']:.1f}% of the serial floor "
          f"{t['serial_floor_s']:.2f} s)  kv_blocks {t['kv_blocks']}  preemptions {t['preemptions']}"
          + (f"  peak {t['peak_memory_GiB']:.1f} GiB" if "peak_memory_GiB" in t else ""))
    if "graph_replay" in t:
        g = t["graph_replay"]
        print(f"decode graph (batch {g['batch']}, the last step's inputs): replay() {g['host_launch_ms']:.2f} ms "
              f"on the host, {g['gpu_ms']:.2f} ms on the GPU")
    if "decode_step_timing" in t:
        d = t["decode_step_timing"]
        print(f"decode steps at batch {d['batch']} (x64 tokens): {d['wall_ms_per_step']:.2f} ms wall a step, "
              f"{d['gpu_ms_per_step']:.2f} ms GPU, {d['host_idle_ms_per_step']:.2f} ms host with the GPU idle")
    if "batch1_ms_per_token" in t:
        print(f"batch-1 decode: {t['batch1_ms_per_token']:.2f} ms/token, bound {t['batch1_bound_ms']:.2f} ms "
              f"({t['batch1_hbm_pct']:.0f}% of HBM bound)")
    if h:
        cap = f", outputs capped at {h['max_tokens_cap']}" if h.get("max_tokens_cap") else ""
        print(f"HF generate ({h['num_requests']} requests, batch {h['batch_size']}{cap}): {h['seconds']:.2f} s  "
              f"{h['output_tok_s']:.0f} out tok/s  {h['roofline_pct']:.1f}% of roofline;  tprun/HF = "
              f"{r['ratio_output_tok_s']:.1f}x")


if __name__ == "__main__":
    main()
