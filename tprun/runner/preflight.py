"""Job-level checks every rank runs locally, before the engine could block in a rendezvous.

Each rank reads the same files and reaches the same verdict, so a bad job fails on every rank at once
with the same message, instead of some ranks failing and the rest waiting for them until a timeout.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tprun.config import JobSpec


class JobError(Exception):
    """A problem with the job as specified; the message names it and what to do."""


# Bytes per element of each safetensors dtype, to check that every tensor fits its data range.
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


@dataclass(frozen=True)
class ModelInfo:
    vocab_size: int | None
    identity: dict[str, Any] = field(default_factory=dict)  # what the manifest fingerprints


def check_world(spec: JobSpec, world_size: int, launcher: str) -> None:
    tp, dp = spec.parallel.tensor_parallel_size, spec.parallel.data_parallel_size
    if spec.parallel.groups == "independent" and world_size != tp:
        raise JobError(
            f"--groups independent: each TP group is a world of its own tp({tp}) processes, but {launcher} "
            f"started WORLD_SIZE({world_size}); launch tp processes per group (dp({dp}) is the number of groups)"
        )
    if spec.parallel.groups == "one-world" and tp * dp != world_size:
        raise JobError(
            f"tp({tp}) * dp({dp}) = {tp * dp} but {launcher} started WORLD_SIZE({world_size}) process(es); "
            f"launch tp * dp processes or change --tp/--dp"
        )


def check_input(path: str) -> None:
    p = Path(path)
    if not p.exists():
        raise JobError(f"input file {p} does not exist; pass --input PATH to a JSONL file")
    if not p.is_file():
        raise JobError(f"input {p} is not a file; pass --input PATH to a JSONL file")
    if not os.access(p, os.R_OK):
        raise JobError(f"input file {p} is not readable by this user")


def check_output(path: str) -> None:
    """The directory must exist (it is created) and take new files; probe with a real write."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise JobError(f"output {out} exists and is not a directory; choose another --output")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise JobError(f"cannot create output directory {out}: {e.strerror}; choose a writable --output") from None
    probe = out / f".tprun-write-probe-{socket.gethostname()}-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise JobError(f"output directory {out} is not writable: {e.strerror}; choose a writable --output") from None


def check_model(path: str) -> ModelInfo:
    """The checkpoint is there and every safetensors file is whole; reads headers only, never weights."""
    model = Path(path)
    if not model.is_dir():
        raise JobError(f"model directory {model} does not exist; pass --model DIR of a HF checkpoint "
                       "(config.json + *.safetensors), e.g. one made by `tprun demo-model DIR`")
    config_file = model / "config.json"
    try:
        config_bytes = config_file.read_bytes()
        config = json.loads(config_bytes)
    except FileNotFoundError:
        raise JobError(f"model directory {model} has no config.json; is it a HF checkpoint?") from None
    except json.JSONDecodeError as e:
        raise JobError(f"{config_file} is not valid JSON ({e.msg} at line {e.lineno})") from None

    index_file = model / "model.safetensors.index.json"
    if index_file.exists():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise JobError(f"{index_file} is corrupt: expected JSON with a \"weight_map\"") from None
        files = sorted(set(weight_map.values()))
        for name in files:
            if not (model / name).exists():
                raise JobError(f"{index_file} lists {name}, which is missing from {model}")
    else:
        files = sorted(p.name for p in model.glob("*.safetensors"))
        if not files:
            raise JobError(f"model directory {model} has no *.safetensors weights")
    digests = {name: _check_safetensors(model / name) for name in files}

    text_config = config.get("text_config", config)
    vocab = text_config.get("vocab_size")
    return ModelInfo(
        vocab_size=vocab if isinstance(vocab, int) else None,
        identity={"config_sha256": hashlib.sha256(config_bytes).hexdigest(), "safetensors": digests,
                  "files": _text_file_digests(model)},
    )


# What besides config and weights decides the tokens: how text becomes ids (tokenizer), how messages
# become text (chat templates) and the defaults generation reads. Small files: hashed whole.
_TEXT_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
               "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json",
               "generation_config.json", "preprocessor_config.json")
_TEXT_GLOBS = ("*.model", "*.tiktoken", "additional_chat_templates/*.jinja")


def _text_file_digests(model: Path) -> dict[str, str]:
    names = {n for n in _TEXT_FILES if (model / n).is_file()}
    names |= {p.relative_to(model).as_posix() for g in _TEXT_GLOBS for p in model.glob(g) if p.is_file()}
    digests = {}
    for name in sorted(names):
        try:
            with open(model / name, "rb") as f:
                digests[name] = hashlib.file_digest(f, "sha256").hexdigest()
        except OSError as e:
            raise JobError(f"cannot read {model / name}: {e.strerror}") from None
    return digests


# Bytes of weight data read from each end of a file for its digest: hashing 100 GB on every rank would
# take minutes; a sample tells apart another checkpoint of the same architecture (other seed, fine-tune).
_DIGEST_SAMPLE = 1 << 20


def _check_safetensors(path: Path) -> str:
    """Validate the header against the file; return a digest of header, size and sampled data."""
    size = path.stat().st_size
    what = f"{path} is corrupt"
    hint = "; re-download or re-convert the checkpoint"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise JobError(f"{what}: {size} bytes, shorter than a safetensors header{hint}")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise JobError(f"{what}: header length {n} exceeds the file size {size}{hint}")
        raw_header = f.read(n)
        try:
            header = json.loads(raw_header)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise JobError(f"{what}: its header is not JSON{hint}") from None
        digest = hashlib.sha256(head + raw_header)
        digest.update(f.read(_DIGEST_SAMPLE))
        f.seek(max(8 + n, size - _DIGEST_SAMPLE))
        digest.update(f.read(_DIGEST_SAMPLE))
    if not isinstance(header, dict):
        raise JobError(f"{what}: its header is not a JSON object{hint}")
    data = size - 8 - n
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = t["data_offsets"]
            numel = 1
            for d in t["shape"]:
                numel *= d
            nbytes = numel * _ITEMSIZE.get(t["dtype"], 0)
        except (KeyError, TypeError, ValueError):
            raise JobError(f"{what}: tensor {name!r} has a malformed header entry{hint}") from None
        if end > data:
            raise JobError(f"{what}: tensor {name!r} ends at byte {end} but the file holds {data} data "
                           f"bytes (truncated?){hint}")
        if t["dtype"] in _ITEMSIZE and end - begin != nbytes:
            raise JobError(f"{what}: tensor {name!r} takes {end - begin} bytes, its shape needs {nbytes}{hint}")
    return f"{size}:{digest.hexdigest()}"
