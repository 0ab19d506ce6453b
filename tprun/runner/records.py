"""What a finished request becomes in results.jsonl, and what the merge reads back from it.

Two output forms share one contract with the merge (`RecordFormat`): tprun records (here) and OpenAI
Batch API lines (openai_batch.py). The chunk writer formats each record once, on the TP leader; the merge
only needs to tell failures apart and count tokens, so it never re-formats anything.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol

from tprun.config import SamplingParams
from tprun.engine.outputs import CompletionOutput, Logprob, RequestOutput
from tprun.runner.inputs import LineError, Record

# JSON has no -Infinity; vLLM's OpenAI server clamps the same way.
MIN_LOGPROB = -9999.0


class RecordFormat(Protocol):
    keep_failed: bool  # does a request the engine failed keep its line in results.jsonl?

    def result(self, record: Record, out: RequestOutput, params: SamplingParams) -> dict[str, Any]: ...

    def failure(self, rec: dict[str, Any], line: int) -> dict[str, Any] | None:
        """The errors.jsonl entry of a formatted result, or None when the request succeeded."""

    def line_error(self, err: LineError) -> dict[str, Any]: ...

    def usage(self, rec: dict[str, Any]) -> tuple[int, int]:
        """(prompt tokens, completion tokens over all samples) of a formatted result."""


def completion_tokens(out: RequestOutput) -> int:
    return sum(len(c.token_ids) for c in out.outputs)


def finite(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB) if not math.isnan(logprob) else MIN_LOGPROB


def top_k(position: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    """The k most likely tokens at a position: the dict holds the chosen token first (whatever its rank),
    then the top k, so sort by rank rather than trusting the order."""
    return sorted(position.items(), key=lambda item: item[1].rank)[:k]


def _token_entry(token_id: int, lp: Logprob) -> dict[str, Any]:
    return {"token_id": token_id, "token": lp.decoded_token, "logprob": finite(lp.logprob)}


def _position(token_id: int, position: dict[int, Logprob], k: int) -> dict[str, Any]:
    return {**_token_entry(token_id, position[token_id]),
            "top_logprobs": [_token_entry(t, lp) for t, lp in top_k(position, k)]}


def sample_logprobs(c: CompletionOutput, k: int) -> list[dict[str, Any]] | None:
    if c.logprobs is None:
        return None
    return [_position(t, pos, k) for t, pos in zip(c.token_ids, c.logprobs)]


def prompt_logprobs(out: RequestOutput, k: int) -> list[dict[str, Any] | None] | None:
    if out.prompt_logprobs is None:
        return None
    return [None if pos is None else _position(t, pos, k) for t, pos in zip(out.prompt_token_ids, out.prompt_logprobs)]


def _sample(c: CompletionOutput, params: SamplingParams) -> dict[str, Any]:
    res = {"index": c.index, "output_text": c.text, "output_token_ids": list(c.token_ids),
           "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
    if params.logprobs is not None:
        res["cumulative_logprob"] = c.cumulative_logprob
        res["logprobs"] = sample_logprobs(c, params.logprobs)
    return res


class TprunFormat:
    """`{"id", "output_text", "output_token_ids", "finish_reason", "stop_reason", "num_prompt_tokens", ...}`:
    the first sample at the top level (so n=1 jobs read as they always did), every sample under
    "outputs" when n > 1. README.md ("Use") documents the schema."""

    keep_failed = True  # the line stays, with finish_reason "error", so results.jsonl has one line per record

    def result(self, record: Record, out: RequestOutput, params: SamplingParams) -> dict[str, Any]:
        first = _sample(out.outputs[0], params)
        del first["index"]
        res: dict[str, Any] = {"id": record.id, **first, "num_prompt_tokens": len(out.prompt_token_ids)}
        if params.prompt_logprobs is not None:
            res["prompt_logprobs"] = prompt_logprobs(out, params.prompt_logprobs)
        if params.n > 1:
            res["outputs"] = [_sample(c, params) for c in out.outputs]
        if out.outputs[0].finish_reason == "error":
            res["error"] = out.outputs[0].error
        return res

    def failure(self, rec: dict[str, Any], line: int) -> dict[str, Any] | None:
        if rec["finish_reason"] != "error":
            return None
        return {"line": line + 1, "id": rec["id"], "error": rec.get("error")}

    def line_error(self, err: LineError) -> dict[str, Any]:
        return err.as_json()

    def usage(self, rec: dict[str, Any]) -> tuple[int, int]:
        samples = rec.get("outputs") or [rec]
        return rec["num_prompt_tokens"], sum(len(s["output_token_ids"]) for s in samples)


TPRUN = TprunFormat()


def record_format(plan: Any) -> RecordFormat:
    """The form of this job's results (a runner.plan.JobPlan's input decides). Call it once the ranks
    have agreed on the job: an OpenAI answer's `created` is read from the manifest rank 0 wrote then."""
    return format_for(plan.index.format, plan.identity, plan.out, plan.spec.model)


def format_for(input_format: str, identity: dict[str, Any], out: Path, model: str) -> RecordFormat:
    if input_format != "openai":
        return TPRUN
    from tprun.runner import manifest
    from tprun.runner.openai_answers import OpenAIFormat

    saved = manifest.load(out) or {}  # none yet: only error lines, which have no `created`, are written
    return OpenAIFormat(job_key=manifest.fingerprint(identity), created=int(saved.get("created", 0)),
                        default_model=model)
