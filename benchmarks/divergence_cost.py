"""Cost of the divergence detector against the step time, on the ranks of a TP group.

    torchrun --nproc-per-node 2 benchmarks/divergence_cost.py --model DIR [--interval 16]

Times the detector's collective (one int64 all_gather on the TP group's gloo group) directly, many times,
and the engine's mean decode step on the same ranks; prints the cost per step at the given interval as a
% of the step time.
"""

from __future__ import annotations

import argparse
import os
import time

from tprun import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--interval", type=int, default=16)
    ap.add_argument("--tp", type=int, default=int(os.environ.get("WORLD_SIZE", "1")))
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    with LLM(model=args.model, tensor_parallel_size=args.tp, dtype=args.dtype) as llm:
        params = SamplingParams(temperature=0.8, max_tokens=128, ignore_eos=True, seed=1)
        prompts = [[10 + i, 20 + i, 30 + i] for i in range(16)]
        llm.generate(prompts, params)  # warm-up
        t = time.perf_counter()
        steps_before = llm.llm_engine.executor.worker.divergence.step
        llm.generate(prompts, params)
        steps = llm.llm_engine.executor.worker.divergence.step - steps_before
        step_s = (time.perf_counter() - t) / steps
        detector = llm.llm_engine.executor.worker.divergence
        n = 500
        t = time.perf_counter()
        for _ in range(n):
            detector.compare()
        check_s = (time.perf_counter() - t) / n
    if llm.dist.rank == 0:
        print(f"tp={args.tp}: mean step {step_s * 1e3:.2f} ms over {steps} steps; one check {check_s * 1e3:.3f} ms; "
              f"every {args.interval} steps: {100 * check_s / args.interval / step_s:.3f} % of step time")


if __name__ == "__main__":
    main()
