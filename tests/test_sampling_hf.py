"""vLLM's sampling contract against HF transformers `generate` in float64, token for token, at TP=1 (in
process) and TP=2 (real torchrun over gloo): stop strings, min_tokens, repetition_penalty, logit_bias,
bad_words, allowed_token_ids, logprobs and prompt_logprobs; presence/frequency penalties against a small
reference of OpenAI's formula; seeded n > 1 and min_p as properties."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.procs import ROOT, torchrun
from tests.rank_results import read_rank_results
from tests.sampling_check import MAX_TOKENS, run

SCENARIOS_VS_HF = ["stop_str", "stop_str_included", "min_tokens", "repetition_penalty", "logit_bias",
                   "bad_words", "allowed_token_ids"]


@pytest.fixture(scope="module")
def hf(demo_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float64, local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(demo_model, local_files_only=True)


@pytest.fixture(scope="module")
def tp1(demo_model):
    return run(str(demo_model), 1, backend="uni")


@pytest.fixture(scope="module")
def tp2_ranks(demo_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("sampling-tp2")
    proc = torchrun(2, [str(ROOT / "tests" / "sampling_check.py"), str(out), "2", str(demo_model)], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return read_rank_results(out, 2)


@pytest.fixture(params=[1, 2], ids=["tp1", "tp2"])
def results(request):
    if request.param == 1:
        return request.getfixturevalue("tp1")
    return request.getfixturevalue("tp2_ranks")[0]["results"]


def hf_generate(hf, prompt: list[int], **kw) -> list[int]:
    model, _ = hf
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False,
                             pad_token_id=model.config.eos_token_id, **kw)
    return out[0, len(prompt):].tolist()


def hf_kwargs(name: str, params: dict, entry: dict, hf) -> dict:
    model, tok = hf
    if name.startswith("stop_str"):
        return {"stop_strings": params["stop"], "tokenizer": tok} if params["stop"] else {}
    if name == "min_tokens":
        return {"eos_token_id": [model.config.eos_token_id, *params["stop_token_ids"]],
                "min_new_tokens": params["min_tokens"]}
    if name == "repetition_penalty":
        return {"repetition_penalty": params["repetition_penalty"]}
    if name == "logit_bias":
        return {"sequence_bias": {(int(t),): b for t, b in params["logit_bias"].items()}}
    if name == "bad_words":
        return {"bad_words_ids": entry["bad_words_ids"]}
    if name == "allowed_token_ids":
        allowed = params["allowed_token_ids"]
        return {"prefix_allowed_tokens_fn": lambda batch_id, ids: allowed}
    raise AssertionError(name)


@pytest.mark.parametrize("name", SCENARIOS_VS_HF)
def test_sampling_feature_matches_hf_generate_float64(name, results, hf):
    changed = 0
    for prompt, greedy, entry in zip(results["prompts"], results["greedy"], results[name][0]):
        got = entry["samples"][0]
        want = hf_generate(hf, prompt, **hf_kwargs(name, entry["params"], entry, hf))
        assert got["token_ids"] == want, (name, prompt)
        changed += got["token_ids"] != greedy
    assert changed, f"{name} changed no output: the scenario does not exercise the feature"


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_ends_the_text_at_the_string(include, results, hf):
    _, tok = hf
    stopped = 0
    for entry in results["stop_str_included" if include else "stop_str"][0]:
        stop, got = entry["params"]["stop"], entry["samples"][0]
        if not stop or got["finish_reason"] != "stop":
            continue
        stopped += 1
        full = tok.decode(got["token_ids"])
        assert got["stop_reason"] == stop[0] and full.endswith(stop[0])
        assert got["text"] == (full if include else full[: -len(stop[0])])
    assert stopped >= 4


def test_min_tokens_holds_back_the_stop_token(results):
    for entry in results["min_tokens"][0]:
        got, stop_id = entry["samples"][0], entry["params"]["stop_token_ids"][0]
        assert len(got["token_ids"]) > 6 or got["finish_reason"] == "length"
        assert stop_id not in got["token_ids"][:6]
        if got["finish_reason"] == "stop":
            assert got["stop_reason"] == stop_id == got["token_ids"][-1]


def openai_penalties_greedy(hf, prompt: list[int], presence: float, frequency: float) -> list[int]:
    """OpenAI's formula: logit -= count * frequency_penalty + (count > 0) * presence_penalty, over the
    tokens generated so far."""
    model, _ = hf
    out: list[int] = []
    with torch.no_grad():
        for _ in range(MAX_TOKENS):
            logits = model(torch.tensor([prompt + out])).logits[0, -1].clone()
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.numel()).double()
            logits -= counts * frequency + (counts > 0).double() * presence
            out.append(int(logits.argmax()))
            if out[-1] == model.config.eos_token_id:
                break
    return out


def test_presence_and_frequency_penalties_match_openai_formula(results, hf):
    changed = 0
    for prompt, greedy, entry in zip(results["prompts"], results["greedy"], results["penalties"][0]):
        p = entry["params"]
        want = openai_penalties_greedy(hf, prompt, p["presence_penalty"], p["frequency_penalty"])
        assert entry["samples"][0]["token_ids"] == want
        changed += want != greedy
    assert changed


def test_logprobs_and_prompt_logprobs_match_hf_log_softmax(results, hf):
    model, _ = hf
    for prompt, entry in zip(results["prompts"], results["logprobs"][0]):
        got = entry["samples"][0]
        ids = prompt + got["token_ids"]
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
        for i, (tok, pos) in enumerate(zip(got["token_ids"], got["logprobs"])):
            _check_position(ref[len(prompt) - 1 + i], tok, pos, k=3)
        assert got["cumulative_logprob"] == pytest.approx(sum(p[0][1] for p in got["logprobs"]), abs=1e-9)
        plp = entry["prompt_logprobs"]
        assert len(plp) == len(prompt) and plp[0] is None
        for p in range(1, len(prompt)):
            _check_position(ref[p - 1], prompt[p], plp[p], k=2)


def _check_position(ref: torch.Tensor, token: int, got: list, k: int) -> None:
    """got: [[token, logprob, rank], ...], the scored token first, then the top k by rank."""
    assert got[0][0] == token
    assert abs(got[0][1] - ref[token].item()) < 1e-9
    assert got[0][2] == int((ref > ref[token]).sum()) + 1
    top = ref.topk(k)
    by_rank = {rank: (t, lp) for t, lp, rank in got}
    for r in range(1, k + 1):
        t, lp = by_rank[r]
        assert t == top.indices[r - 1].item() and abs(lp - top.values[r - 1].item()) < 1e-9


def test_n4_samples_are_reproducible_and_differ(results):
    first, second = results["n4"]
    assert first == second  # per-request seeds: a second call draws the same samples
    differing = 0
    for entry in first:
        samples = [s["token_ids"] for s in entry["samples"]]
        assert len(samples) == 4 and all(0 < len(s) <= 8 for s in samples)
        differing += len({tuple(s) for s in samples}) > 1
    assert differing == len(first)


def test_min_p_samples_only_tokens_at_least_min_p_times_the_top(results):
    for entry in results["min_p"][0]:
        for pos in entry["samples"][0]["logprobs"]:
            chosen = pos[0][1]
            top = next(lp for _, lp, rank in pos if rank == 1)
            assert chosen >= top + math.log(entry["params"]["min_p"]) - 1e-9


def test_tp2_ranks_agree_on_every_sample(tp2_ranks, tp1):
    assert tp2_ranks[0]["sha256"] == tp2_ranks[1]["sha256"]
    # Seeded samples do not depend on the TP size either (float64: same logits up to rounding).
    assert tp2_ranks[0]["results"]["n4"] == tp1["n4"]


def test_generate_calls_without_seeds_draw_new_samples(results):
    first, second = results["unseeded"]
    assert first != second


@pytest.mark.parametrize("field,value,words", [
    ("logit_bias", {"100000": 1.0}, "logit_bias has token id 100000 outside"),
    ("allowed_token_ids", [5, 100000], "allowed_token_ids has token id 100000 outside"),
    ("stop_token_ids", [100000], "stop_token_ids has token id 100000 outside"),
])
def test_token_ids_outside_the_vocabulary_are_a_request_error_naming_the_field(field, value, words, demo_model):
    from tprun import LLM, SamplingParams

    with LLM(model=str(demo_model), dtype="float32", distributed_executor_backend="uni") as llm:
        outs = llm.generate([[5, 6, 7], [5, 6, 7]], [SamplingParams(**{field: value}), SamplingParams(max_tokens=2)])
    assert outs[0].outputs[0].finish_reason == "error" and words in outs[0].outputs[0].error
    assert outs[1].outputs[0].finish_reason == "length"


@pytest.mark.parametrize("fields,words", [
    ({"n": 0}, "n"), ({"min_p": 1.5}, "min_p"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"presence_penalty": 3}, "presence_penalty"), ({"min_tokens": 20, "max_tokens": 4}, "min_tokens"),
    ({"stop": [""]}, "stop"), ({"logprobs": -1}, "logprobs"), ({"logit_bias": {"5": 300}}, "logit_bias"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "exactly one"),
    ({"bad_words": [""]}, "bad_words"), ({"allowed_token_ids": []}, "allowed_token_ids"),
])
def test_bad_sampling_values_are_refused_naming_the_field(fields, words):
    from pydantic import ValidationError

    from tprun import SamplingParams

    with pytest.raises(ValidationError, match=words):
        SamplingParams(**fields)


def test_structured_outputs_always_parse_validate_or_match(results):
    import re

    import jsonschema

    free = 0
    for entry in results["structured"]:
        so, text = entry["params"]["structured_outputs"], entry["text"]
        if so is None:
            free += 1
            continue
        assert entry["finish_reason"] == "stop", entry  # the grammar completed and took EOS
        if so["json"] is not None:
            jsonschema.validate(json.loads(text), so["json"])
        elif so["regex"] is not None:
            assert re.fullmatch(so["regex"], text), text
        elif so["choice"] is not None:
            assert text in so["choice"]
        elif so["grammar"] is not None:
            assert re.fullmatch(r"\([0-9]{1,2}\) (up|down)", text), text
        else:
            assert isinstance(json.loads(text), dict)
    assert free == 2


def test_a_schema_that_cannot_compile_is_an_error_for_that_request_only(demo_model):
    from tprun import LLM, SamplingParams

    bad = SamplingParams(max_tokens=8, structured_outputs={"json": {"type": "no-such-type"}})
    with LLM(model=str(demo_model), dtype="float32", distributed_executor_backend="uni") as llm:
        outs = llm.generate([[5, 6, 7], [5, 6, 7]], [bad, SamplingParams(max_tokens=3)])
    assert outs[0].outputs[0].finish_reason == "error"
    assert "structured_outputs.json cannot be compiled" in outs[0].outputs[0].error
    assert outs[1].outputs[0].finish_reason == "length"
