"""Runs every sampling feature on one demo checkpoint and writes this rank's results (float64).

Usage (TP=2 under torchrun): sampling_check.py OUT_DIR TP MODEL_DIR
tests/test_sampling_hf.py calls run() in process for TP=1 and compares both against HF generate.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.engine_prompts import make_prompts
from tests.rank_results import write_rank_results
from tprun import LLM, SamplingParams

LENGTHS = [3, 17, 5, 29, 11, 1, 23, 8]
MAX_TOKENS = 16


def pick_stop(tokenizer, out: list[int]) -> tuple[str, int] | None:
    """A stop string that the greedy output first completes at token k + 1 (k >= 2): the text of tokens
    k and k + 1, valid UTF-8 and found nowhere earlier in the text."""
    for k in range(2, len(out) - 3):
        text = tokenizer.decode(out[: k + 2])
        stop = tokenizer.decode(out[k: k + 2])
        if "\ufffd" not in stop and stop.strip() and text.find(stop) == len(text) - len(stop):
            return stop, k + 1
    return None


def scenarios(llm: LLM, prompts: list[list[int]], greedy: list[list[int]]) -> dict[str, list[SamplingParams]]:
    tok = llm.tokenizer
    base = {"temperature": 0.0, "max_tokens": MAX_TOKENS}
    stops = [pick_stop(tok, g) for g in greedy]
    greedy = [g + [9, 10, 11, 12, 13, 14] for g in greedy]  # ids to pick from where greedy stopped early
    return {
        "stop_str": [SamplingParams(**base, stop=[s[0]] if s else []) for s in stops],
        "stop_str_included": [SamplingParams(**base, stop=[s[0]] if s else [],
                                             include_stop_str_in_output=True) for s in stops],
        # The greedy token at position 2 is a stop token: min_tokens=6 must hold it back until 6 are out.
        "min_tokens": [SamplingParams(**base, stop_token_ids=[g[2]], min_tokens=6) for g in greedy],
        "repetition_penalty": [SamplingParams(**base, repetition_penalty=1.7)] * len(prompts),
        "logit_bias": [SamplingParams(**base, logit_bias={g[1]: -30.0, g[3]: 4.0}) for g in greedy],
        "bad_words": [SamplingParams(**base, bad_words=[tok.decode(g[1:2]), tok.decode(g[4:6])]) for g in greedy],
        "allowed_token_ids": [SamplingParams(**base, allowed_token_ids=sorted({*g[::2], 9, 11, 13}))
                              for g in greedy],
        "penalties": [SamplingParams(**base, presence_penalty=1.5, frequency_penalty=0.8)] * len(prompts),
        "logprobs": [SamplingParams(**base, logprobs=3, prompt_logprobs=2)] * len(prompts),
        "n4": [SamplingParams(temperature=1.0, n=4, max_tokens=8, seed=11 + i) for i in range(len(prompts))],
        "min_p": [SamplingParams(temperature=1.0, min_p=0.2, max_tokens=MAX_TOKENS, seed=5 + i, logprobs=1)
                  for i in range(len(prompts))],
    }


STRUCTURED = [
    {"json": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 10}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"}}, "required": ["name", "age", "ok"], "additionalProperties": False}},
    {"json": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 4}},
    {"regex": "[a-z]{3,8}-[0-9]{2}"},
    {"choice": ["yes", "no", "maybe so"]},
    {"grammar": 'root ::= "(" [0-9] [0-9]? ")" " " ("up" | "down")'},
    {"json_object": True},
    None,  # free text in the same batch
]


def structured_requests(prompts: list[list[int]], tokenizer) -> tuple[list[list[int]], list[SamplingParams]]:
    """Every structured kind twice (two prompts, temperature 1, seeded) and free text, in one batch. A random
    model writes JSON strings of hundreds of tokens: for any JSON object, a bias towards '"' and '}' ends it
    within max_tokens."""
    closers = {tokenizer.convert_tokens_to_ids(c): 6.0 for c in ('"', "}")}
    out_prompts, params = [], []
    for i, so in enumerate(STRUCTURED):
        bias = closers if so is not None and "json_object" in so else None
        for j in range(2):
            out_prompts.append(prompts[(2 * i + j) % len(prompts)])
            params.append(SamplingParams(temperature=1.0, seed=100 * i + j, max_tokens=96, structured_outputs=so,
                                         logit_bias=bias))
    return out_prompts, params


def _logprobs(lps) -> list | None:
    if lps is None:
        return None
    return [None if d is None else [[t, lp.logprob, lp.rank] for t, lp in d.items()] for d in lps]


def run(model_dir: str, tp: int, backend: str = "external_launcher") -> dict:
    results: dict = {}
    with LLM(model=model_dir, tensor_parallel_size=tp, dtype="float64",
             distributed_executor_backend=backend) as llm:
        prompts = make_prompts(llm.tokenizer.vocab_size, LENGTHS, seed=3)
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
        greedy = [o.outputs[0].token_ids for o in outs]
        results["prompts"] = prompts
        results["greedy"] = greedy
        so_prompts, so_params = structured_requests(prompts, llm.tokenizer)
        results["structured"] = [{"params": json.loads(p.model_dump_json()), "text": o.outputs[0].text,
                                  "finish_reason": o.outputs[0].finish_reason, "error": o.outputs[0].error}
                                 for o, p in zip(llm.generate(so_prompts, so_params), so_params)]
        # No seed anywhere: each generate() call must draw new samples (vLLM), identically on every rank.
        unseeded = SamplingParams(temperature=1.0, max_tokens=8)
        results["unseeded"] = [[o.outputs[0].token_ids for o in llm.generate(prompts, unseeded)] for _ in range(2)]
        for name, params in scenarios(llm, prompts, greedy).items():
            runs = [llm.generate(prompts, params)]
            if name == "n4":
                runs.append(llm.generate(prompts, params))
            results[name] = [[{
                "params": json.loads(p.model_dump_json()),
                "bad_words_ids": [list(w) for w in _bad_ids(llm, p)],
                "samples": [{"token_ids": c.token_ids, "text": c.text, "finish_reason": c.finish_reason,
                             "stop_reason": c.stop_reason, "cumulative_logprob": c.cumulative_logprob,
                             "logprobs": _logprobs(c.logprobs)} for c in o.outputs],
                "prompt_logprobs": _logprobs(o.prompt_logprobs),
            } for o, p in zip(outs_, params)] for outs_ in runs]
    return results


def _bad_ids(llm: LLM, params: SamplingParams) -> list[tuple[int, ...]]:
    from tprun.engine.request_options import bad_words_ids

    return bad_words_ids(params.bad_words or [], llm.tokenizer)


def main() -> None:
    out, tp, model = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    write_rank_results(out, run(model, tp))


if __name__ == "__main__":
    main()
