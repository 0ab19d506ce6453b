"""The input JSONL: one request per line, validated line by line, read back chunk by chunk.

Every rank scans the same file with the same code, so every rank reaches the same verdict on every line
without exchanging a message. The scan keeps only what later passes need (byte offsets of chunk starts,
the bad lines, the ids seen), so inputs larger than memory stream through.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tprun.config import SamplingParams

PROMPT_FIELDS = ("prompt", "prompt_token_ids", "messages")
SAMPLING_FIELDS = tuple(SamplingParams.model_fields)
ALLOWED_FIELDS = ("id", *PROMPT_FIELDS, *SAMPLING_FIELDS)


class InputChangedError(RuntimeError):
    """A line reads differently than when the job scanned the input."""


@dataclass(frozen=True)
class Record:
    line: int  # 0-based line index in the input file; the default id and the seed derivation use it
    id: str | int
    prompt: str | list[int] | list[dict[str, str]]
    kind: str  # one of PROMPT_FIELDS
    overrides: dict[str, Any] = field(default_factory=dict)  # per-line sampling fields
    api: Any = None  # an OpenAI batch line's request (openai_batch.BatchRequest): what its answer echoes

    def engine_prompt(self) -> str | dict[str, Any]:
        return self.prompt if self.kind == "prompt" else {self.kind: self.prompt}


@dataclass(frozen=True)
class LineError:
    line: int  # 0-based, like Record.line
    reason: str
    id: str | int | None = None
    code: str = "invalid_request"  # the OpenAI batch error code, for OpenAI-form inputs

    def as_json(self) -> dict[str, Any]:
        # Users open the file in an editor: report the 1-based line number it shows.
        return {"line": self.line + 1, "id": self.id, "error": self.reason}

    def __str__(self) -> str:
        return f"line {self.line + 1}: {self.reason}"


def record_seed(job_seed: int, line: int) -> int:
    """A per-record sampling seed that depends only on the job seed and the record's line.

    So results do not depend on how records are chunked or which data-parallel group runs them.
    """
    digest = hashlib.blake2b(f"{job_seed}:{line}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # 63 bits: fits torch.Generator.manual_seed


def sampling_for(record: Record, defaults: SamplingParams, job_seed: int) -> SamplingParams:
    params = defaults.model_copy(update=record.overrides)
    if params.seed is None:
        params = params.model_copy(update={"seed": record_seed(job_seed, record.line)})
    return params


def parse_line(raw: bytes, line: int, defaults: SamplingParams, vocab_size: int | None = None,
               input_format: str = "tprun") -> Record | LineError | None:
    """One line -> a Record, a LineError saying what is wrong, or None for a blank line.

    input_format is the file's resolved form, "tprun" or "openai" (see scan_input)."""
    obj = _json_object(raw, line)
    if obj is None or isinstance(obj, LineError):
        return obj
    from tprun.runner import openai_batch

    if openai_batch.is_batch_line(obj) != (input_format == "openai"):
        return openai_batch.mixed_forms_error(obj, line, input_format)
    if input_format == "openai":
        return openai_batch.parse_request(obj, line, defaults, vocab_size)
    return _parse_tprun(obj, line, defaults, vocab_size)


def _json_object(raw: bytes, line: int) -> dict[str, Any] | LineError | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return LineError(line, f"not valid UTF-8: byte 0x{raw[e.start]:02x} at column {e.start + 1}; "
                               "re-encode the file as UTF-8", code="invalid_json_line")
    if line == 0:
        text = text.removeprefix("\ufeff")  # a byte-order mark some editors write
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return LineError(line, f"malformed JSON: {e.msg} at column {e.colno}", code="invalid_json_line")
    if not isinstance(obj, dict):
        return LineError(line, f"expected a JSON object, got {_json_type(obj)}", code="invalid_json_line")
    return obj


def _parse_tprun(obj: dict[str, Any], line: int, defaults: SamplingParams, vocab_size: int | None
                 ) -> Record | LineError:
    rid = obj.get("id", line)
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        return LineError(line, f"id must be a string or an integer, got {_json_type(rid)}")

    unknown = sorted(set(obj) - set(ALLOWED_FIELDS))
    if unknown:
        return LineError(line, f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: "
                               f"{', '.join(ALLOWED_FIELDS)}", rid)

    given = [f for f in PROMPT_FIELDS if f in obj]
    if not given:
        return LineError(line, f"missing prompt: give one of {', '.join(PROMPT_FIELDS)}", rid)
    if len(given) > 1:
        return LineError(line, f"give exactly one of {', '.join(PROMPT_FIELDS)}, not {' and '.join(given)}", rid)
    kind = given[0]
    problem = _check_prompt(kind, obj[kind], vocab_size)
    if problem:
        return LineError(line, problem, rid)

    overrides = {k: obj[k] for k in SAMPLING_FIELDS if k in obj}
    if overrides:
        try:
            merged = SamplingParams.model_validate({**defaults.model_dump(), **overrides})
        except ValidationError as e:
            return LineError(line, "invalid sampling value: " + _pydantic_reason(e), rid)
        overrides = {k: getattr(merged, k) for k in overrides}
    return Record(line=line, id=rid, prompt=obj[kind], kind=kind, overrides=overrides)


def _check_prompt(kind: str, value: Any, vocab_size: int | None) -> str | None:
    if kind == "prompt":
        if not isinstance(value, str):
            return f"prompt must be a string, got {_json_type(value)}"
        if value == "":
            return "empty prompt"
    elif kind == "prompt_token_ids":
        if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return "prompt_token_ids must be a list of integers"
        if not value:
            return "empty prompt: prompt_token_ids is []"
        bad = [t for t in value if t < 0 or (vocab_size is not None and t >= vocab_size)]
        if bad:
            limit = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
            return f"prompt_token_ids has token id {bad[0]} outside the model's vocabulary {limit}"
    else:
        if not isinstance(value, list) or not value:
            return "messages must be a non-empty list of {\"role\": ..., \"content\": ...} objects"
        for i, m in enumerate(value):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                return f"messages[{i}] must be an object with string \"role\" and \"content\""
        if not any(m["content"] for m in value):
            return "empty prompt: every message's content is empty"
    return None


def _pydantic_reason(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        name = ".".join(str(p) for p in err["loc"])
        parts.append(f"{name}={err['input']!r}: {err['msg']}")
    return "; ".join(parts)


def _json_type(v: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
             int: "a number", float: "a number"}
    return names.get(type(v), type(v).__name__)


@dataclass
class InputIndex:
    """What one scan of the input learns: enough to validate, chunk and fingerprint it."""

    path: Path
    chunk_size: int
    num_lines: int = 0
    num_records: int = 0
    chunk_offsets: list[int] = field(default_factory=list)  # byte offset of line k * chunk_size
    errors: list[LineError] = field(default_factory=list)
    sha256: str = ""
    format: str = "tprun"  # the lines' form: "tprun" or "openai" (OpenAI Batch API requests)
    _bad_lines: set[int] = field(default_factory=set)

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_offsets)

    def chunk_lines(self, k: int) -> range:
        return range(k * self.chunk_size, min((k + 1) * self.chunk_size, self.num_lines))

    def read_chunk(self, k: int, defaults: SamplingParams, vocab_size: int | None = None) -> list[Record]:
        """The valid records of chunk k, in line order (each line re-parsed exactly as the scan did)."""
        lines = self.chunk_lines(k)
        records = []
        with open(self.path, "rb") as f:
            f.seek(self.chunk_offsets[k])
            for line in lines:
                raw = f.readline()
                if line in self._bad_lines:
                    continue
                rec = parse_line(raw, line, defaults, vocab_size, self.format)
                if isinstance(rec, Record):
                    records.append(rec)
                elif isinstance(rec, LineError):
                    raise InputChangedError(f"{self.path} changed while the job ran ({rec}); rerun the job")
        return records


def scan_input(path: str | Path, chunk_size: int, defaults: SamplingParams,
               vocab_size: int | None = None, input_format: str = "auto") -> InputIndex:
    """Read the whole input once: per-line errors, duplicate ids, chunk offsets and a content hash.

    A duplicate id is an error on every occurrence after the first, so the first one still runs.
    input_format "auto": the first line that is a JSON object decides the form of the whole file.
    """
    index = InputIndex(path=Path(path), chunk_size=chunk_size)
    index.format = "tprun" if input_format == "auto" else input_format
    undecided = input_format == "auto"
    digest = hashlib.sha256()
    first_line_of: dict[tuple[bool, str | int], int] = {}
    offset = 0
    with open(path, "rb") as f:
        for line, raw in enumerate(f):
            if line % chunk_size == 0:
                index.chunk_offsets.append(offset)
            offset += len(raw)
            digest.update(raw)
            index.num_lines = line + 1
            if undecided and isinstance(obj := _json_object(raw, line), dict):
                from tprun.runner.openai_batch import is_batch_line

                index.format, undecided = ("openai" if is_batch_line(obj) else "tprun"), False
            rec = parse_line(raw, line, defaults, vocab_size, index.format)
            if rec is None:
                continue
            if isinstance(rec, Record):
                key = (isinstance(rec.id, str), rec.id)
                if key in first_line_of:
                    name = "custom_id" if index.format == "openai" else "id"
                    rec = LineError(line, f"duplicate {name} {rec.id!r} (first used on line "
                                          f"{first_line_of[key] + 1}); {name}s must be unique", rec.id,
                                    code=f"duplicate_{name}")
                else:
                    first_line_of[key] = line
                    index.num_records += 1
                    continue
            index.errors.append(rec)
            index._bad_lines.add(line)
    index.sha256 = digest.hexdigest()
    return index
