"""Runs the engine on the demo checkpoints and writes this rank's results (launched by torchrun).

Usage: engine_check.py OUT_DIR TP MODEL_DIR [MODEL_DIR ...]
Writes OUT_DIR/rank<R>.json: {model_dir: {scenario: {...}}, "sha256": digest of everything}.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from tests.engine_prompts import PROMPT_LENGTHS, make_prompts
from tprun import LLM, SamplingParams

SCENARIOS = {
    # name: (engine kwargs, sampling kwargs)
    "greedy": ({}, {"temperature": 0.0, "max_tokens": 12}),
    # 24 blocks of 4 tokens cannot hold the 8 prompts at once: the scheduler must preempt.
    "preempt": ({"block_size": 4, "num_gpu_blocks_override": 24}, {"temperature": 0.0, "max_tokens": 12}),
    "sampled": ({}, {"temperature": 0.8, "top_p": 0.9, "max_tokens": 12, "seed": 1234}),
}


def run_model(model_dir: str, tp: int) -> dict:
    results = {}
    for name, (engine_kwargs, sampling) in SCENARIOS.items():
        with LLM(model=model_dir, tensor_parallel_size=tp, dtype="float64", **engine_kwargs) as llm:
            prompts = make_prompts(llm.tokenizer.vocab_size, PROMPT_LENGTHS)
            params = [SamplingParams(**{**sampling, **({"seed": sampling["seed"] + i} if "seed" in sampling else {})})
                      for i in range(len(prompts))]
            outs = llm.generate(prompts, params)
            entry = {"token_ids": [o.outputs[0].token_ids for o in outs],
                     "finish_reasons": [o.outputs[0].finish_reason for o in outs],
                     "preemptions": llm.llm_engine.scheduler.num_preemptions,
                     "num_blocks": llm.llm_engine.num_blocks}
            if name == "sampled":
                entry["second_run"] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
            results[name] = entry
    return results


def main() -> None:
    out, tp, models = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    results = {m: run_model(m, tp) for m in models}
    blob = json.dumps(results, sort_keys=True)
    rank = int(os.environ.get("RANK", "0"))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps({"results": results,
                                                      "sha256": hashlib.sha256(blob.encode()).hexdigest()}))


if __name__ == "__main__":
    main()
