"""results.jsonl records: the schema README.md documents, for n > 1, logprobs and prompt logprobs.

The engine's outputs are built by hand here (the contract of tprun/engine/outputs.py), so the format is
pinned independently of what the engine samples; the end-to-end runs check it through `tprun run`.
"""

from __future__ import annotations

import json

from tprun.config import SamplingParams
from tprun.engine.outputs import CompletionOutput, Logprob, RequestOutput
from tprun.runner import parts
from tprun.runner.inputs import LineError, Record
from tprun.runner.records import MIN_LOGPROB, TPRUN


def two_samples() -> RequestOutput:
    """n=2, logprobs=2: per position the chosen token first (whatever its rank), then the top 2."""
    s0 = CompletionOutput(
        index=0, text="ef", token_ids=[5, 6], finish_reason="length", cumulative_logprob=-2.1,
        logprobs=[{5: Logprob(-2.0, 3, "e"), 8: Logprob(-0.5, 1, "h"), 9: Logprob(-1.0, 2, "i")},
                  {6: Logprob(-0.1, 1, "f"), 10: Logprob(-2.5, 2, "j")}])
    s1 = CompletionOutput(
        index=1, text="g", token_ids=[7], finish_reason="stop", stop_reason="</s>", cumulative_logprob=-0.3,
        logprobs=[{7: Logprob(-0.3, 1, "g"), 8: Logprob(float("-inf"), 2, "h")}])
    prompt = [None, {2: Logprob(-4.0, 7, "b"), 11: Logprob(-0.2, 1, "k"), 12: Logprob(-1.9, 2, "l")},
              {3: Logprob(-0.7, 1, "c"), 13: Logprob(-0.9, 2, "m")}]
    return RequestOutput("0:0", "abc", [1, 2, 3], [s0, s1], prompt_logprobs=prompt)


def entry(token_id, token, logprob, top):
    return {"token_id": token_id, "token": token, "logprob": logprob,
            "top_logprobs": [{"token_id": t, "token": s, "logprob": lp} for t, s, lp in top]}


def test_record_with_n_samples_logprobs_and_prompt_logprobs():
    params = SamplingParams(n=2, logprobs=2, prompt_logprobs=2, max_tokens=2)
    rec = TPRUN.result(Record(line=4, id="a", prompt="abc", kind="prompt"), two_samples(), params)
    first_logprobs = [entry(5, "e", -2.0, [(8, "h", -0.5), (9, "i", -1.0)]),  # the top 2 by rank, not the chosen
                      entry(6, "f", -0.1, [(6, "f", -0.1), (10, "j", -2.5)])]
    second_logprobs = [entry(7, "g", -0.3, [(7, "g", -0.3), (8, "h", MIN_LOGPROB)])]  # -inf is not JSON
    assert rec == {
        "id": "a", "output_text": "ef", "output_token_ids": [5, 6], "finish_reason": "length", "stop_reason": None,
        "cumulative_logprob": -2.1, "logprobs": first_logprobs, "num_prompt_tokens": 3,
        "prompt_logprobs": [None, entry(2, "b", -4.0, [(11, "k", -0.2), (12, "l", -1.9)]),
                            entry(3, "c", -0.7, [(3, "c", -0.7), (13, "m", -0.9)])],
        "outputs": [
            {"index": 0, "output_text": "ef", "output_token_ids": [5, 6], "finish_reason": "length",
             "stop_reason": None, "cumulative_logprob": -2.1, "logprobs": first_logprobs},
            {"index": 1, "output_text": "g", "output_token_ids": [7], "finish_reason": "stop",
             "stop_reason": "</s>", "cumulative_logprob": -0.3, "logprobs": second_logprobs},
        ],
    }
    json.dumps(rec, allow_nan=False)  # strict JSON: every reader parses it
    assert TPRUN.usage(rec) == (3, 3)  # completion tokens over both samples


def test_plain_record_keeps_the_fields_it_always_had():
    out = RequestOutput("0:0", "abc", [1, 2, 3], [CompletionOutput(0, "ef", [5, 6], "stop", stop_reason=2)])
    rec = TPRUN.result(Record(line=0, id=0, prompt="abc", kind="prompt"), out, SamplingParams())
    assert tuple(rec) == parts.RESULT_FIELDS
    assert rec["stop_reason"] == 2 and TPRUN.usage(rec) == (3, 2)


def test_merge_counts_every_sample_and_lists_failed_records(tmp_path):
    ok = TPRUN.result(Record(line=0, id="a", prompt="abc", kind="prompt"), two_samples(),
                      SamplingParams(n=2, logprobs=2))
    failed = TPRUN.result(Record(line=2, id="b", prompt="x", kind="prompt"),
                          RequestOutput("0:1", "x", [4] * 9, [CompletionOutput(0, "", [], "error", error="too long")]),
                          SamplingParams())
    parts.write_part(tmp_path, 0, [{"line": 0, **ok}, {"line": 2, **failed}], {})
    stats = parts.merge(tmp_path, 1, [LineError(1, "malformed JSON")])
    assert (stats.records, stats.errors, stats.prompt_tokens, stats.output_tokens) == (2, 2, 12, 3)
    assert [r["id"] for r in map(json.loads, (tmp_path / parts.RESULTS).read_text().splitlines())] == ["a", "b"]
    errors = [json.loads(x) for x in (tmp_path / parts.ERRORS).read_text().splitlines()]
    assert errors == [{"line": 2, "id": None, "error": "malformed JSON"}, {"line": 3, "id": "b", "error": "too long"}]
