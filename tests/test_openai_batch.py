"""OpenAI Batch API files: request lines map to tprun's sampling, answers validate as OpenAI's own types.

The reference for the output is the `openai` package's pydantic models (what a user's pipeline parses
the output file with), not our idea of the format.
"""

from __future__ import annotations

import json

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion

from tests.runner_harness import read_jsonl, run_args, run_cli, write_jsonl
from tests.test_records import two_samples
from tprun.config import JobSpec, SamplingParams
from tprun.engine.outputs import CompletionOutput, RequestOutput
from tprun.runner import manifest, parts
from tprun.runner.inputs import Record, scan_input
from tprun.runner.openai_answers import OpenAIFormat
from tprun.runner.openai_batch import BatchRequest

DEFAULTS = SamplingParams(max_tokens=8)
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


def chat(cid: str, **body) -> dict:
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "demo", "messages": [{"role": "user", "content": "hi"}], **body}}


def completion(cid: str, **body) -> dict:
    return {"custom_id": cid, "method": "POST", "url": "/v1/completions", "body": {"model": "demo", "prompt": "a", **body}}


def scan(tmp_path, rows, input_format="auto", vocab_size=331):
    index = scan_input(write_jsonl(tmp_path / "in.jsonl", rows), 4, DEFAULTS, vocab_size, input_format)
    records = [r for k in range(index.num_chunks) for r in index.read_chunk(k, DEFAULTS, vocab_size)]
    return index, records


def test_body_fields_map_to_sampling_params(tmp_path):
    rows = [
        chat("c1", max_completion_tokens=5, temperature=0.5, top_p=0.9, n=2, stop="\n", seed=3,
             presence_penalty=0.5, frequency_penalty=-0.5, logit_bias={"7": -100, "9": 2.5}, logprobs=True,
             top_logprobs=3, user="u1", response_format={"type": "json_schema", "json_schema": {
                 "name": "person", "schema": SCHEMA, "strict": True}}),
        chat("c2", messages=[{"role": "system", "content": [{"type": "text", "text": "be"}, {"type": "text",
                                                                                            "text": "brief"}]},
                             {"role": "user", "content": "hi"}], logprobs=True,
             response_format={"type": "json_object"}),
        completion("p1", prompt=[[5, 6, 7]], logprobs=2, max_tokens=4, stop=["x", "y"]),
        completion("p2", prompt=["one"], response_format={"type": "text"}, seed=None),
    ]
    index, records = scan(tmp_path, rows)
    assert index.format == "openai" and index.errors == []
    c1, c2, p1, p2 = records
    assert [r.id for r in records] == ["c1", "c2", "p1", "p2"]
    assert c1.api == BatchRequest("chat", "demo") and p1.api == BatchRequest("completions", "demo")
    params = c1.overrides
    assert params["max_tokens"] == 5 and params["n"] == 2 and params["stop"] == ["\n"] and params["seed"] == 3
    assert (params["temperature"], params["top_p"], params["presence_penalty"], params["frequency_penalty"]) == \
        (0.5, 0.9, 0.5, -0.5)
    assert params["logit_bias"] == {7: -100.0, 9: 2.5} and params["logprobs"] == 3
    assert params["structured_outputs"].json == SCHEMA
    assert c2.prompt[0]["content"] == "be\nbrief" and c2.overrides["logprobs"] == 0
    assert c2.overrides["structured_outputs"].json_object is True
    assert (p1.kind, p1.prompt, p1.overrides) == ("prompt_token_ids", [5, 6, 7],
                                                   {"logprobs": 2, "max_tokens": 4, "stop": ["x", "y"]})
    assert (p2.kind, p2.prompt, p2.overrides) == ("prompt", "one", {"structured_outputs": None})


BAD = [
    (chat("ok"), None),
    (chat("t", tools=[]), "body field(s) 'tools' not supported for /v1/chat/completions"),
    (chat("s", stream=False), "body field(s) 'stream' not supported"),
    (completion("e", echo=True, best_of=2), "body field(s) 'echo', 'best_of' not supported for /v1/completions"),
    (completion("tl", top_logprobs=2), "'top_logprobs' not supported for /v1/completions"),
    ({**chat("u"), "url": "/v1/embeddings"}, "url '/v1/embeddings' is not supported"),
    ({**chat("g"), "method": "GET"}, "method 'GET' is not supported"),
    (completion("b", prompt=["one", "two"]), "batch prompts are not supported; one prompt per line"),
    (chat("lp", top_logprobs=2), "body.top_logprobs needs body.logprobs: true"),
    (chat("mx", max_completion_tokens=0), "body.max_completion_tokens=0"),
    (completion("lb", logit_bias={"x": 1}), "body.logit_bias key 'x' is not a token id"),
    (completion("lv", logit_bias={"400": 1}), "logit_bias token id 400 is outside the model's vocabulary"),
    (chat("rf", response_format={"type": "xml"}), "body.response_format type 'xml' is not supported"),
    (chat("im", messages=[{"role": "user", "content": [{"type": "image_url"}]}]), "content[0] is 'image_url'"),
    (completion("id", prompt=[1, 999]), "token id 999 outside the model's vocabulary"),
    ({"custom_id": 5, "method": "POST", "url": "/v1/completions", "body": {}}, "custom_id must be a non-empty string"),
    ({**chat("o"), "temperature": 0}, "unknown field(s) 'temperature' in an OpenAI batch line"),
    ({"id": 1, "prompt": "a tprun line"}, "mixes OpenAI batch lines and tprun lines"),
    (chat("ok"), "duplicate custom_id 'ok' (first used on line 1)"),
]


def test_bad_lines_name_the_line_and_the_field(tmp_path):
    index, records = scan(tmp_path, [row for row, _ in BAD])
    assert [r.id for r in records] == ["ok"]
    expected = [(line + 1, why) for line, (_, why) in enumerate(BAD) if why]
    assert len(index.errors) == len(expected)
    for err, (n, why) in zip(index.errors, expected):
        assert str(err).startswith(f"line {n}: ") and why in err.reason, (n, err)
    # In errors.jsonl, each is an OpenAI batch error line that still says which line it was.
    fmt = OpenAIFormat(job_key="k")
    mixed = fmt.line_error(index.errors[-2])
    assert mixed == {"id": mixed["id"], "custom_id": None, "response": None,
                     "error": {"code": "mixed_input_forms", "message": str(index.errors[-2])}}
    assert mixed["id"].startswith("batch_req_") and "line 18: mixes" in mixed["error"]["message"]
    assert fmt.line_error(index.errors[-1])["error"]["code"] == "duplicate_custom_id"


def test_forms_are_detected_per_file_or_forced(tmp_path):
    tprun_rows = [{"id": "a", "prompt": "x"}, chat("c")]
    index, records = scan(tmp_path, ["", *tprun_rows])  # a blank first line does not decide
    assert index.format == "tprun" and [r.id for r in records] == ["a"]
    assert str(index.errors[0]).startswith("line 3: mixes OpenAI batch lines and tprun lines")
    index, records = scan(tmp_path, [chat("c"), completion("p")], input_format="tprun")
    assert records == [] and all("mixes" in e.reason for e in index.errors)
    index, _ = scan(tmp_path, [{"id": "a", "prompt": "x"}], input_format="openai")
    assert "every line needs custom_id, method, url and body" in index.errors[0].reason


def test_the_fingerprint_covers_the_input_format():
    spec = JobSpec(model="m", input="i", output="o")
    identities = [manifest.job_identity(spec.model_copy(update={"input_format": f}), "sha", 1, {})
                  for f in ("auto", "openai", "tprun")]
    assert len({manifest.fingerprint(i) for i in identities}) == 3


def answer(endpoint: str, params: SamplingParams, out: RequestOutput | None = None) -> dict:
    fmt = OpenAIFormat(job_key="job", created=1700000000, default_model="/models/demo")
    record = Record(line=3, id="req-1", prompt="abc", kind="prompt", api=BatchRequest(endpoint, None))
    return fmt.result(record, out or two_samples(), params)


def test_chat_answer_is_an_openai_chat_completion():
    line = answer("chat", SamplingParams(n=2, logprobs=2))
    assert line["custom_id"] == "req-1" and line["error"] is None and line["response"]["status_code"] == 200
    assert line == answer("chat", SamplingParams(n=2, logprobs=2))  # deterministic ids
    body = ChatCompletion.model_validate(line["response"]["body"])
    assert (body.object, body.created, body.model) == ("chat.completion", 1700000000, "/models/demo")
    assert [c.message.content for c in body.choices] == ["ef", "g"]
    assert [c.finish_reason for c in body.choices] == ["length", "stop"]
    assert body.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}) == \
        {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    first = body.choices[0].logprobs.content
    assert [(t.token, t.logprob, t.bytes) for t in first] == [("e", -2.0, [101]), ("f", -0.1, [102])]
    assert [(t.token, t.logprob) for t in first[0].top_logprobs] == [("h", -0.5), ("i", -1.0)]
    assert body.choices[1].logprobs.content[0].top_logprobs[1].logprob == -9999.0
    plain = ChatCompletion.model_validate(answer("chat", SamplingParams(n=2))["response"]["body"])
    assert [c.logprobs for c in plain.choices] == [None, None]


def test_completion_answer_is_an_openai_text_completion():
    body = Completion.model_validate(answer("completions", SamplingParams(n=2, logprobs=2))["response"]["body"])
    assert body.object == "text_completion" and [c.text for c in body.choices] == ["ef", "g"]
    assert body.usage.completion_tokens == 3 and body.usage.total_tokens == 6
    lp = body.choices[0].logprobs
    assert lp.tokens == ["e", "f"] and lp.token_logprobs == [-2.0, -0.1] and lp.text_offset == [0, 1]
    assert lp.top_logprobs[0] == {"e": -2.0, "h": -0.5, "i": -1.0}  # the chosen token and the top k


def test_a_failed_request_is_an_error_line_only(tmp_path):
    failed = RequestOutput("0:0", "x", [4] * 9, [CompletionOutput(0, "", [], "error", error="prompt too long")])
    fmt = OpenAIFormat(job_key="job")
    record = Record(line=1, id="bad", prompt="x", kind="prompt", api=BatchRequest("chat", "demo"))
    good = answer("chat", SamplingParams(n=2))
    parts.write_part(tmp_path, 0, [{"line": 0, **good}, {"line": 1, **fmt.result(record, failed, SamplingParams())}], {})
    stats = parts.merge(tmp_path, 1, [], fmt)
    assert (stats.records, stats.errors, stats.prompt_tokens, stats.output_tokens) == (1, 1, 3, 3)
    results = [json.loads(x) for x in (tmp_path / parts.RESULTS).read_text().splitlines()]
    assert [r["custom_id"] for r in results] == ["req-1"]
    (error,) = [json.loads(x) for x in (tmp_path / parts.ERRORS).read_text().splitlines()]
    assert error["custom_id"] == "bad" and error["response"] is None
    assert error["error"] == {"code": "request_failed", "message": "line 2: prompt too long"}


@pytest.mark.parametrize("rf", [{"type": "json_schema", "json_schema": {"name": "x"}},
                                {"type": "json_schema", "json_schema": {"schema": {}, "extra": 1}}])
def test_bad_json_schema_formats_are_refused(tmp_path, rf):
    index, _ = scan(tmp_path, [chat("c", response_format=rf)])
    assert "body.response_format.json_schema" in index.errors[0].reason


TIGHT = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
         "required": ["color", "ok"], "additionalProperties": False}


def test_tprun_run_answers_an_openai_batch_file(demo_model, tmp_path):
    """One job with chat and completion lines, n=2, logprobs, stop strings, a JSON schema, a bad line and a
    prompt too long: every answer parses as OpenAI's type, in input order, with usage that adds up."""
    import jsonschema
    from transformers import AutoTokenizer

    rows = [
        chat("json", max_tokens=48, temperature=0, response_format={"type": "json_schema", "json_schema": {
            "name": "pick", "schema": TIGHT, "strict": True}}),
        completion("cmp", prompt="the quick brown", max_tokens=6, n=2, logprobs=3, stop=["e", "a"]),
        chat("chat", n=2, logprobs=True, top_logprobs=2, max_completion_tokens=5, stop="\n", seed=11),
        completion("ids", prompt=[3, 50, 70, 90], max_tokens=3, model=None),  # echoes --model
        chat("tools", tools=[]),
        completion("long", prompt=[7] * 300),  # longer than the demo model's 256 positions
    ]
    out = tmp_path / "out"
    r = run_cli(run_args(demo_model, write_jsonl(tmp_path / "in.jsonl", rows), out, "--dtype", "float32",
                         "--max-tokens", "4", "--seed", "1"))
    assert r.returncode == 0, r.stderr
    results = read_jsonl(out / "results.jsonl")
    assert [x["custom_id"] for x in results] == ["json", "cmp", "chat", "ids"]
    assert len({x["id"] for x in results}) == 4 and len({x["response"]["body"]["created"] for x in results}) == 1
    bodies = {x["custom_id"]: (ChatCompletion if x["custom_id"] in ("json", "chat") else Completion)
              .model_validate(x["response"]["body"]) for x in results}
    assert all(x["response"]["status_code"] == 200 and x["error"] is None for x in results)

    tok = AutoTokenizer.from_pretrained(demo_model)
    hi = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True)
    hi = hi["input_ids"] if hasattr(hi, "keys") else hi
    prompt_tokens = {"json": len(hi), "cmp": len(tok("the quick brown").input_ids), "chat": len(hi), "ids": 4}
    for cid, body in bodies.items():
        assert body.usage.prompt_tokens == prompt_tokens[cid], cid
        assert body.usage.total_tokens == body.usage.prompt_tokens + body.usage.completion_tokens
        assert body.model == (str(demo_model) if cid == "ids" else "demo")

    pick = bodies["json"].choices[0]
    assert pick.finish_reason == "stop", pick  # the schema's JSON ends well inside 48 tokens
    jsonschema.validate(json.loads(pick.message.content), TIGHT)

    cmp = bodies["cmp"]
    assert len(cmp.choices) == 2 and cmp.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in cmp.choices)
    for c in cmp.choices:
        assert all(len(top) <= 4 for top in c.logprobs.top_logprobs)  # the chosen token and the top 3
        # Each token's own text, special tokens included (vLLM's); the text skips the special ones.
        spoken = [t for t in c.logprobs.tokens if t not in tok.all_special_tokens]
        assert "".join(spoken).startswith(c.text)
        if c.finish_reason == "stop":
            assert c.stop_reason in ("e", "a") and c.stop_reason not in c.text
        else:
            assert len(c.logprobs.tokens) == 6
    chat_body = bodies["chat"]
    assert len(chat_body.choices) == 2
    assert chat_body.usage.completion_tokens == sum(len(c.logprobs.content) for c in chat_body.choices)
    assert all(len(t.top_logprobs) == 2 for c in chat_body.choices for t in c.logprobs.content)
    assert [c.message.content for c in chat_body.choices][0] != [c.message.content for c in chat_body.choices][1]
    assert bodies["ids"].usage.completion_tokens <= 3 and bodies["ids"].choices[0].logprobs is None

    errors = read_jsonl(out / "errors.jsonl")
    assert [(e["custom_id"], e["response"], e["error"]["code"]) for e in errors] == [
        ("tools", None, "invalid_request"), ("long", None, "request_failed")]
    assert errors[0]["error"]["message"].startswith("line 5: body field(s) 'tools' not supported")
    assert errors[1]["error"]["message"].startswith("line 6: ")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["output_tokens"] == sum(b.usage.completion_tokens for b in bodies.values())
