"""The shared-prefix variant of ../shared/BENCH.md: prefix caching on against off, in one run.

1024 requests share one 2048-token prefix (random ids from random.Random(1)), each followed by its own
suffix of U[32, 128] random ids, and generate 128 tokens each (ignore_eos). Reports tok/s with caching on
and off, their ratio, the prompt tokens served from the cache, whether the tokens agree, and % of a floor
that counts the prefix's prefill once (every decode step still reads the prefix's K/V):

    python benchmarks/shared_prefix.py --shape llama3-8b --json out.json        # GPU, full workload
    python benchmarks/shared_prefix.py --device cpu --shape small               # CPU, scaled down
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
from models import rank_model  # noqa: E402
from roofline import floor, measure_ceilings, model_cost  # noqa: E402
from throughput import sync  # noqa: E402

GPU_DEFAULTS = {"num_requests": 1024, "prefix_len": 2048, "suffix_len": (32, 128), "output_len": 128,
                "dtype": "bfloat16"}
CPU_DEFAULTS = {"num_requests": 32, "prefix_len": 256, "suffix_len": (8, 32), "output_len": 16, "dtype": "float32"}


def shared_prefix_prompts(num_requests: int, prefix_len: int, suffix_len: tuple[int, int], vocab_size: int,
                          seed: int = 1) -> list[list[int]]:
    """One prefix, then per request a suffix of uniform length; everything from random.Random(seed)."""
    rng = random.Random(seed)
    prefix = [rng.randrange(vocab_size) for _ in range(prefix_len)]
    return [prefix + [rng.randrange(vocab_size) for _ in range(rng.randint(*suffix_len))]
            for _ in range(num_requests)]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", choices=["qwen3-0.6b", "llama3-8b", "small"], default=None)
    p.add_argument("--tp", type=int, default=int(os.environ.get("WORLD_SIZE", "1")))
    p.add_argument("--num-requests", type=int)
    p.add_argument("--prefix-len", type=int)
    p.add_argument("--suffix-len", type=int, nargs=2)
    p.add_argument("--output-len", type=int)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--model-root", default=os.environ.get("TPRUN_BENCH_MODELS", "/tmp/tprun-bench-models"))
    p.add_argument("--json", help="write the result here (rank 0)")
    args = p.parse_args()
    for key, value in (GPU_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.shape = args.shape or ("llama3-8b" if args.device == "cuda" else "small")
    return args


def run(args, model_dir: Path, prompts: list[list[int]], caching: bool, vocab_size: int) -> dict:
    from tprun import LLM, SamplingParams

    llm = LLM(model=str(model_dir), tensor_parallel_size=args.tp, dtype=args.dtype, seed=0, device=args.device,
              max_model_len=args.prefix_len + args.suffix_len[1] + args.output_len + 16,
              max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=caching)
    # Warm-up on unrelated prompts: compiles kernels without putting the shared prefix in the cache.
    rng = random.Random(99)
    warm = [{"prompt_token_ids": [rng.randrange(vocab_size) for _ in range(n)]} for n in (8, 64, 512)]
    llm.generate(warm, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    scheduler = llm.llm_engine.scheduler
    cached_before = scheduler.num_cached_prompt_tokens
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    sync(args.device)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    sync(args.device)
    seconds = time.perf_counter() - t0
    result = {"seconds": seconds, "cached_prompt_tokens": scheduler.num_cached_prompt_tokens - cached_before,
              "preemptions": scheduler.num_preemptions, "evictions": scheduler.block_manager.num_evictions,
              "kv_blocks": llm.llm_engine.num_blocks, "token_ids": [o.outputs[0].token_ids for o in outs]}
    llm.shutdown()
    del llm
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    args = parse_args()
    rank = int(os.environ.get("RANK", "0"))
    model_dir, dtype, config = rank_model(args, rank)
    prompts = shared_prefix_prompts(args.num_requests, args.prefix_len, tuple(args.suffix_len), config.vocab_size)
    ceilings = measure_ceilings(torch.device(args.device)) if rank == 0 else None
    on = run(args, model_dir, prompts, True, config.vocab_size)
    off = run(args, model_dir, prompts, False, config.vocab_size)
    if rank != 0:
        return
    cost = model_cost(config, dtype.itemsize)
    devices = args.tp if args.device == "cuda" else 1
    full = [(len(p), args.output_len) for p in prompts]
    # The prefix's prefill counted once; decode still reads every request's whole context.
    once = [(len(prompts[0]), args.output_len)] + [(len(p) - args.prefix_len, args.output_len) for p in prompts[1:]]
    compute_s = floor(cost, once, ceilings, devices).compute_s
    memory_s = floor(cost, full, ceilings, devices).memory_s
    floor_s = max(compute_s, memory_s)
    out_tokens = args.output_len * len(prompts)
    same = sum(a == b for a, b in zip(on.pop("token_ids"), off.pop("token_ids")))
    for r in (on, off):
        r |= {"output_tok_s": out_tokens / r["seconds"], "roofline_pct": 100 * floor_s / r["seconds"]}
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": ceilings.device_name, "tp": args.tp, "shape": args.shape, "dtype": args.dtype,
        "workload": {"num_requests": len(prompts), "prefix_len": args.prefix_len, "suffix_len": args.suffix_len,
                     "output_len": args.output_len, "prompt_tokens": sum(p for p, _ in full),
                     "max_num_batched_tokens": args.max_num_batched_tokens},
        "ceilings": asdict(ceilings), "floor": {"seconds": floor_s, "compute_s": compute_s, "memory_s": memory_s},
        "caching_on": on, "caching_off": off, "speedup": off["seconds"] / on["seconds"],
        "identical_outputs": f"{same}/{len(prompts)}",
    }
    print(f"\nshared prefix: {args.shape} {args.dtype} tp={args.tp} on {result['device']}; {len(prompts)} requests, "
          f"prefix {args.prefix_len}, suffix {args.suffix_len}, {args.output_len} out; floor {floor_s:.2f} s "
          f"(compute {compute_s:.2f}, memory {memory_s:.2f})")
    for name, r in (("caching on ", on), ("caching off", off)):
        print(f"{name}: {r['seconds']:.2f} s  {r['output_tok_s']:.0f} out tok/s  {r['roofline_pct']:.1f}% of "
              f"roofline  cached prompt tokens {r['cached_prompt_tokens']}  preemptions {r['preemptions']}")
    print(f"on/off speedup {result['speedup']:.2f}x; identical outputs {result['identical_outputs']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
