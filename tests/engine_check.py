"""Runs the engine on the demo checkpoints and writes this rank's results (launched by torchrun).

Usage: engine_check.py OUT_DIR TP MODEL_DIR [MODEL_DIR ...]
Writes OUT_DIR/rank<R>.json: {model_dir: {scenario: {...}}, "sha256": digest of everything}.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tests.engine_prompts import PROMPT_LENGTHS, make_prompts, make_shared_prefix_prompts
from tests.rank_results import write_rank_results
from tprun import LLM, SamplingParams

GREEDY = {"temperature": 0.0, "max_tokens": 12}
# 24 blocks of 4 tokens cannot hold the prompts at once: the scheduler must preempt (and, with prefix
# caching, evict); 16 tokens a step split the longer prompts into chunks that share steps with decodes.
SMALL = {"block_size": 4, "num_gpu_blocks_override": 24}
SCENARIOS = {
    # name: (engine kwargs, sampling kwargs, prompts); prefix caching is on unless said otherwise.
    "greedy": ({}, GREEDY, "plain"),
    "preempt": (SMALL, GREEDY, "plain"),
    "sampled": ({}, {"temperature": 0.8, "top_p": 0.9, "max_tokens": 12, "seed": 1234}, "plain"),
    "shared": ({**SMALL, "max_num_batched_tokens": 16}, GREEDY, "shared"),
    "shared_nocache": ({**SMALL, "max_num_batched_tokens": 16, "enable_prefix_caching": False}, GREEDY, "shared"),
}
PROMPTS = {"plain": lambda vocab: make_prompts(vocab, PROMPT_LENGTHS), "shared": make_shared_prefix_prompts}
# The scheduler's features (chunks, prefix cache) do not depend on the model, only on the attention they
# drive: these families cover full attention, sliding windows, soft-capping, QK-norm and sinks. The other
# families run the plain scenarios (CI time).
SCHEDULER_ARCHS = ("llama", "mistral", "gemma3", "gpt_oss")


def scenarios_for(arch: str) -> list[str]:
    return [n for n in SCENARIOS if arch in SCHEDULER_ARCHS or SCENARIOS[n][2] == "plain"]


def _params(sampling: dict, n: int) -> list[SamplingParams]:
    return [SamplingParams(**{**sampling, **({"seed": sampling["seed"] + i} if "seed" in sampling else {})})
            for i in range(n)]


def run_model(model_dir: str, tp: int) -> dict:
    """Every scenario of the model's family; scenarios with the same engine settings share one engine.
    The model directory is named after its family (tests/test_engine_hf.py)."""
    results = {}
    names = scenarios_for(Path(model_dir).name)
    for engine_kwargs in {repr(SCENARIOS[n][0]): SCENARIOS[n][0] for n in names}.values():
        with LLM(model=model_dir, tensor_parallel_size=tp, dtype="float64", **engine_kwargs) as llm:
            for name in [n for n in names if SCENARIOS[n][0] == engine_kwargs]:
                results[name] = _run_scenario(llm, name)
    return results


def _run_scenario(llm: LLM, name: str) -> dict:
    _, sampling, prompt_set = SCENARIOS[name]
    llm.reset_prefix_cache()  # each scenario starts cold, as in an engine of its own
    prompts = PROMPTS[prompt_set](llm.tokenizer.vocab_size)
    preemptions = llm.llm_engine.scheduler.num_preemptions
    cached = llm.llm_engine.scheduler.num_cached_prompt_tokens
    evictions = llm.llm_engine.scheduler.block_manager.num_evictions
    outs = llm.generate(prompts, _params(sampling, len(prompts)))
    entry = {"token_ids": [o.outputs[0].token_ids for o in outs],
             "finish_reasons": [o.outputs[0].finish_reason for o in outs],
             "preemptions": llm.llm_engine.scheduler.num_preemptions - preemptions,
             "cached_prompt_tokens": llm.llm_engine.scheduler.num_cached_prompt_tokens - cached,
             "evictions": llm.llm_engine.scheduler.block_manager.num_evictions - evictions,
             "num_blocks": llm.llm_engine.num_blocks}
    if name == "sampled":
        again = llm.generate(prompts, _params(sampling, len(prompts)))
        entry["second_run"] = [o.outputs[0].token_ids for o in again]
    if name == "shared":  # the "sampled" requests again, in chunks of 16 tokens, with preemption
        plain = PROMPTS["plain"](llm.tokenizer.vocab_size)
        sampled = llm.generate(plain, _params(SCENARIOS["sampled"][1], len(plain)))
        entry["sampled_chunked"] = [o.outputs[0].token_ids for o in sampled]
    return entry


def main() -> None:
    out, tp, models = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    write_rank_results(out, {m: run_model(m, tp) for m in models})


if __name__ == "__main__":
    main()
