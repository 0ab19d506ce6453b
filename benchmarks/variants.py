"""Variants of the bench workload, timed on the same LLM right after the plain (greedy) run.

- sampled: temperature 0.8, top_p 0.95, seed = the request's index (../shared/BENCH.md)
- json: every request under one JSON schema (structured output), sampled as above so the mask matters
- logprobs: greedy with logprobs=5 for every generated token
- NAME-sync: variant NAME with scheduling ahead off (async_scheduling=False), to measure what it gains

A name given twice is timed twice (the second as NAME#2): pairs in one process show the spread.

Each reports output tokens per second; a structured request ends when its JSON is complete, so its
output count differs from the plain run's and only tok/s compare.
"""

from __future__ import annotations

import time

SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string"}, "year": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}},
    "summary": {"type": "string"}}, "required": ["title", "year", "tags", "summary"]}


def variant_params(name: str, requests) -> list:
    from tprun import SamplingParams

    name = name.removesuffix("-sync")
    if name == "greedy":
        return [SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True) for r in requests]
    if name == "sampled":
        return [SamplingParams(temperature=0.8, top_p=0.95, seed=i, max_tokens=r.max_tokens, ignore_eos=True)
                for i, r in enumerate(requests)]
    if name == "json":
        return [SamplingParams(temperature=0.8, top_p=0.95, seed=i, max_tokens=r.max_tokens, ignore_eos=True,
                               structured_outputs={"json": SCHEMA}) for i, r in enumerate(requests)]
    if name == "logprobs":
        return [SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True, logprobs=5)
                for r in requests]
    raise ValueError(f"unknown variant {name!r}")


def run_variants(llm, requests, names: list[str], sync) -> dict:
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    out = {}
    for name in names:
        params = variant_params(name, requests)
        llm.reset_prefix_cache()  # the previous run cached these very prompts
        ahead = llm.llm_engine.config.async_scheduling
        llm.llm_engine.config.async_scheduling = ahead and not name.endswith("-sync")
        sync()
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        sync()
        seconds = time.perf_counter() - t0
        llm.llm_engine.config.async_scheduling = ahead
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        key = name if name not in out else f"{name}#{sum(k.split('#')[0] == name for k in out) + 1}"
        out[key] = {"seconds": seconds, "output_tokens": tokens, "output_tok_s": tokens / seconds,
                     "finished_stop": sum(o.outputs[0].finish_reason == "stop" for o in outs)}
        print(f"variant {name}: {seconds:.2f} s, {tokens} output tokens, {tokens / seconds:.0f} out tok/s", flush=True)
    return out
