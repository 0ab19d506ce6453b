"""OpenAI Batch API request lines in (openai_answers.py writes the answers).

A line is `{"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body"}`.
Its body maps onto the same Record and SamplingParams a tprun line gives (custom_id is the record id), so
chunking, seeds and resume work unchanged; only the record's answer is formatted differently. Every body
field is either mapped or refused by name: a field tprun would silently drop (tools, echo, ...) would
return answers to a question the user did not ask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from tprun.config import SamplingParams
from tprun.runner.inputs import LineError, Record, _check_prompt, _json_type

LINE_FIELDS = ("custom_id", "method", "url", "body")
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
_COMMON = ("model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "presence_penalty",
           "frequency_penalty", "logit_bias", "logprobs", "response_format", "user")
BODY_FIELDS = {
    "chat": ("messages", *_COMMON, "max_completion_tokens", "top_logprobs"),
    "completions": ("prompt", *_COMMON),
}
# Body fields whose value passes to SamplingParams as is, under the same name.
_SAME_NAME = ("temperature", "top_p", "n", "seed", "presence_penalty", "frequency_penalty", "stop")


def is_batch_line(obj: dict[str, Any]) -> bool:
    """A tprun line never has these keys (they are not tprun fields), so one of them decides."""
    return any(k in obj for k in LINE_FIELDS)


def mixed_forms_error(obj: dict[str, Any], line: int, input_format: str) -> LineError:
    if input_format == "openai":
        why = ("this file is read as OpenAI batch requests (its first line, or --input-format openai), and this "
               "line is not one: every line needs custom_id, method, url and body")
        rid = None
    else:
        why = ("this file is read as tprun lines (its first line, or --input-format tprun), and this line is an "
               "OpenAI batch request; put each form in a file of its own")
        rid = obj.get("custom_id") if isinstance(obj.get("custom_id"), str) else None
    return LineError(line, f"mixes OpenAI batch lines and tprun lines; {why}", rid, code="mixed_input_forms")


@dataclass(frozen=True)
class BatchRequest:
    """What an answer echoes of its request."""

    endpoint: str  # "chat" | "completions"
    model: str | None


class _BodyError(ValueError):
    pass


def parse_request(obj: dict[str, Any], line: int, defaults: SamplingParams, vocab_size: int | None
                  ) -> Record | LineError:
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return LineError(line, f"custom_id must be a non-empty string, got {_json_type(cid)}")
    extra = sorted(set(obj) - set(LINE_FIELDS))
    if extra:
        return LineError(line, f"unknown field(s) {', '.join(map(repr, extra))} in an OpenAI batch line; a line "
                               "has custom_id, method, url and body (sampling goes inside body)", cid)
    missing = [f for f in LINE_FIELDS if f not in obj]
    if missing:
        return LineError(line, f"missing {', '.join(missing)}: an OpenAI batch line has custom_id, method, url "
                               "and body", cid)
    if obj["method"] != "POST":
        return LineError(line, f"method {obj['method']!r} is not supported; OpenAI batch requests use \"POST\"", cid)
    endpoint = ENDPOINTS.get(obj["url"]) if isinstance(obj["url"], str) else None
    if endpoint is None:
        return LineError(line, f"url {obj['url']!r} is not supported; use {' or '.join(ENDPOINTS)}", cid)
    if not isinstance(obj["body"], dict):
        return LineError(line, f"body must be an object, got {_json_type(obj['body'])}", cid)
    try:
        kind, prompt, overrides, source = _map_body(endpoint, obj["url"], obj["body"], vocab_size)
        model = obj["body"].get("model")
        if model is not None and not isinstance(model, str):
            raise _BodyError(f"body.model must be a string, got {_json_type(model)}")
    except _BodyError as e:
        return LineError(line, str(e), cid)
    try:
        merged = SamplingParams.model_validate({**defaults.model_dump(), **overrides})
    except ValidationError as e:
        return LineError(line, "invalid value: " + _reason(e, source), cid)
    overrides = {k: getattr(merged, k) for k in overrides}
    return Record(line=line, id=cid, prompt=prompt, kind=kind, overrides=overrides,
                  api=BatchRequest(endpoint, model))


def _reason(e: ValidationError, source: dict[str, str]) -> str:
    """pydantic's complaint, in the body's field names (max_completion_tokens, not max_tokens)."""
    parts = []
    for err in e.errors():
        loc = [str(p) for p in err["loc"]]
        name = ".".join(["body", source.get(loc[0], loc[0]), *loc[1:]]) if loc else "body"
        parts.append(f"{name}={err['input']!r}: {err['msg']}")
    return "; ".join(parts)


def _map_body(endpoint: str, url: str, body: dict[str, Any], vocab_size: int | None
              ) -> tuple[str, Any, dict[str, Any], dict[str, str]]:
    """(prompt kind, prompt, SamplingParams overrides, our field -> body field it came from)."""
    allowed = BODY_FIELDS[endpoint]
    unknown = [k for k in body if k not in allowed]
    if unknown:
        raise _BodyError(f"body field(s) {', '.join(map(repr, unknown))} not supported for {url}; tprun maps "
                         f"{', '.join(allowed)}")
    if endpoint == "chat":
        if "messages" not in body:
            raise _BodyError("body.messages is missing")
        kind, prompt = "messages", _messages(body["messages"])
    else:
        kind, prompt = _completion_prompt(body.get("prompt"))
    problem = _check_prompt(kind, prompt, vocab_size)
    if problem:
        raise _BodyError(f"body.{'messages' if kind == 'messages' else 'prompt'}: {problem}")

    given = {k: v for k, v in body.items() if v is not None}  # null is OpenAI's "not given"
    overrides: dict[str, Any] = {k: given[k] for k in _SAME_NAME if k in given}
    source = {k: k for k in overrides}
    limits = [k for k in ("max_tokens", "max_completion_tokens") if k in given]
    if len(limits) == 2 and given[limits[0]] != given[limits[1]]:
        raise _BodyError("body.max_tokens and body.max_completion_tokens differ; give one of them")
    if limits:
        overrides["max_tokens"], source["max_tokens"] = given[limits[0]], limits[0]
    if "logit_bias" in given:
        overrides["logit_bias"], source["logit_bias"] = _logit_bias(given["logit_bias"], vocab_size), "logit_bias"
    if endpoint == "chat":
        if "logprobs" in given and not isinstance(given["logprobs"], bool):
            raise _BodyError("body.logprobs must be true or false for chat completions (top_logprobs says how many)")
        if "top_logprobs" in given and not given.get("logprobs"):
            raise _BodyError("body.top_logprobs needs body.logprobs: true")
        if given.get("logprobs"):
            overrides["logprobs"], source["logprobs"] = given.get("top_logprobs", 0), "top_logprobs"
    elif "logprobs" in given:
        if isinstance(given["logprobs"], bool):
            raise _BodyError("body.logprobs must be an integer for completions: how many top log-probs per token")
        overrides["logprobs"], source["logprobs"] = given["logprobs"], "logprobs"
    if "response_format" in given:
        overrides["structured_outputs"] = _structured(given["response_format"])
        source["structured_outputs"] = "response_format"
    return kind, prompt, overrides, source


def _messages(value: Any) -> Any:
    """Content given as a list of text parts becomes one string, joined by newlines as vLLM does."""
    if not isinstance(value, list):
        return value
    messages = []
    for i, m in enumerate(value):
        if isinstance(m, dict) and isinstance(m.get("content"), list):
            texts = []
            for j, part in enumerate(m["content"]):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    kind = part.get("type") if isinstance(part, dict) else _json_type(part)
                    raise _BodyError(f"body.messages[{i}].content[{j}] is {kind!r}: only text parts "
                                     "({\"type\": \"text\", \"text\": ...}) are supported")
                texts.append(part["text"])
            m = {**m, "content": "\n".join(texts)}
        messages.append(m)
    return messages


def _completion_prompt(p: Any) -> tuple[str, Any]:
    if p is None:
        raise _BodyError("body.prompt is missing")
    if isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p):  # a list of prompts
        if len(p) > 1:
            raise _BodyError("batch prompts are not supported; one prompt per line")
        p = p[0]
    if isinstance(p, str):
        return "prompt", p
    if isinstance(p, list):
        return "prompt_token_ids", p
    raise _BodyError(f"body.prompt must be a string or a list of token ids, got {_json_type(p)}")


def _logit_bias(value: Any, vocab_size: int | None) -> dict[int, Any]:
    if not isinstance(value, dict):
        raise _BodyError(f"body.logit_bias must be an object of token id -> bias, got {_json_type(value)}")
    bias = {}
    for key, b in value.items():
        try:
            tok = int(key)
        except ValueError:
            raise _BodyError(f"body.logit_bias key {key!r} is not a token id (keys are token ids as strings)") from None
        if vocab_size is not None and not 0 <= tok < vocab_size:
            raise _BodyError(f"body.logit_bias token id {tok} is outside the model's vocabulary [0, {vocab_size})")
        bias[tok] = b
    return bias


def _structured(rf: Any) -> dict[str, Any] | None:
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("schema"), dict):
            raise _BodyError("body.response_format.json_schema.schema must be a JSON schema object")
        unknown = sorted(set(js) - {"name", "description", "schema", "strict"})
        if unknown:
            raise _BodyError(f"body.response_format.json_schema field(s) {', '.join(map(repr, unknown))} not "
                             "supported; give name, description, schema, strict")
        return {"json": js["schema"]}
    raise _BodyError(f"body.response_format type {kind!r} is not supported; use json_schema, json_object or text")
