"""OpenAI Batch API output lines: `chat.completion` / `text_completion` answers, and error lines.

Ids and `created` must be the same on every rank and every rerun (a resumed job's lines must match an
uninterrupted one's): ids hash the job fingerprint and the line, `created` is the job's start as
recorded once in OUT/manifest.json.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, ClassVar

from tprun.config import SamplingParams
from tprun.engine.outputs import CompletionOutput, Logprob, RequestOutput
from tprun.runner.inputs import LineError, Record
from tprun.runner.records import completion_tokens, finite, top_k


@dataclass(frozen=True)
class OpenAIFormat:
    """Batch output lines (records.RecordFormat). A failed request is an error line only: its answer
    would not be a valid chat.completion, and OpenAI keeps failures out of the output file too."""

    job_key: str  # the job fingerprint: ids are unique per job and line, and the same on every rank
    created: int = 0
    default_model: str = ""  # echoed when a body names no model
    keep_failed: ClassVar[bool] = False

    def _hash(self, line: int) -> str:
        return hashlib.blake2b(f"{self.job_key}:{line}".encode(), digest_size=12).hexdigest()

    def _error(self, line: int, custom_id: Any, code: str, message: str) -> dict[str, Any]:
        return {"id": f"batch_req_{self._hash(line)}", "custom_id": custom_id, "response": None,
                "error": {"code": code, "message": message}}

    def result(self, record: Record, out: RequestOutput, params: SamplingParams) -> dict[str, Any]:
        first = out.outputs[0]
        if first.finish_reason == "error":
            return self._error(record.line, record.id, "request_failed", f"line {record.line + 1}: {first.error}")
        h, req = self._hash(record.line), record.api
        answer = chat_completion if req.endpoint == "chat" else text_completion
        body = answer(h, self.created, req.model or self.default_model, out, params)
        return {"id": f"batch_req_{h}", "custom_id": record.id,
                "response": {"status_code": 200, "request_id": f"req_{h}", "body": body}, "error": None}

    def failure(self, rec: dict[str, Any], line: int) -> dict[str, Any] | None:
        return rec if rec["error"] is not None else None

    def line_error(self, err: LineError) -> dict[str, Any]:
        return self._error(err.line, err.id, err.code, str(err))

    def usage(self, rec: dict[str, Any]) -> tuple[int, int]:
        if rec["response"] is None:
            return 0, 0
        u = rec["response"]["body"]["usage"]
        return u["prompt_tokens"], u["completion_tokens"]


def _usage(out: RequestOutput) -> dict[str, int]:
    prompt, completion = len(out.prompt_token_ids), completion_tokens(out)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _text(token_id: int, lp: Logprob) -> str:
    return lp.decoded_token if lp.decoded_token is not None else f"token_id:{token_id}"  # vLLM's fallback


def _chat_token(token_id: int, lp: Logprob) -> dict[str, Any]:
    text = _text(token_id, lp)
    return {"token": text, "logprob": finite(lp.logprob), "bytes": list(text.encode("utf-8"))}


def _chat_logprobs(c: CompletionOutput, k: int) -> dict[str, Any] | None:
    if c.logprobs is None:
        return None
    return {"content": [{**_chat_token(t, pos[t]), "top_logprobs": [_chat_token(i, lp) for i, lp in top_k(pos, k)]}
                        for t, pos in zip(c.token_ids, c.logprobs)]}


def _completion_logprobs(c: CompletionOutput) -> dict[str, Any] | None:
    """OpenAI's legacy shape: per token its text, logprob, and {text: logprob} of the chosen token and
    the top k (so up to k + 1 entries, as OpenAI documents); text_offset indexes the completion text."""
    if c.logprobs is None:
        return None
    tokens = [_text(t, pos[t]) for t, pos in zip(c.token_ids, c.logprobs)]
    offsets, at = [], 0
    for tok in tokens:
        offsets.append(at)
        at += len(tok)
    return {"tokens": tokens, "token_logprobs": [finite(pos[t].logprob) for t, pos in zip(c.token_ids, c.logprobs)],
            "top_logprobs": [_by_text(pos) for pos in c.logprobs], "text_offset": offsets}


def _by_text(position: dict[int, Logprob]) -> dict[str, float]:
    """Keyed by text, so tokens with the same text (partial UTF-8 bytes all read "\ufffd") collide: the
    first, the chosen token, keeps its own value, so it agrees with token_logprobs."""
    top: dict[str, float] = {}
    for i, lp in position.items():
        top.setdefault(_text(i, lp), finite(lp.logprob))
    return top


def chat_completion(h: str, created: int, model: str, out: RequestOutput, params: SamplingParams) -> dict[str, Any]:
    choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                "logprobs": None if params.logprobs is None else _chat_logprobs(c, params.logprobs),
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason} for c in out.outputs]
    return {"id": f"chatcmpl-{h}", "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": _usage(out)}


def text_completion(h: str, created: int, model: str, out: RequestOutput, params: SamplingParams) -> dict[str, Any]:
    choices = [{"index": c.index, "text": c.text,
                "logprobs": None if params.logprobs is None else _completion_logprobs(c),
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason} for c in out.outputs]
    return {"id": f"cmpl-{h}", "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": _usage(out)}
