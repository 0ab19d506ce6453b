"""OUT/manifest.json: which job an output directory belongs to, so a rerun resumes only its own job.

The fingerprint covers what decides the records: model (config, weight, tokenizer, chat template and
generation config files, not their path),
input content (not its path), dtype, tensor-parallel size, sampling, the engine seed and chunk size.
It leaves out what a user changes to make a job fit or run elsewhere (dp, memory and batching knobs,
timeouts, launcher resources), so a requeued job may resume with a different number of DP groups.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Literal

from tprun.config import JobSpec
from tprun.runner.leases import create_exclusive
from tprun.runner.parts import SUCCESS, atomic_write, clear_outputs
from tprun.runner.preflight import JobError

MANIFEST = "manifest.json"
VERSION = 1
# Engine fields that change speed or memory but not the tokens of a deterministic engine.
_OPERATIONAL = frozenset({
    "block_size", "max_num_seqs", "max_num_batched_tokens", "gpu_memory_utilization", "kv_cache_memory",
    "num_gpu_blocks_override", "enforce_eager", "device", "distributed_executor_backend",
    "divergence_check_interval", "dist_timeout_s", "enable_prefix_caching",
})

State = Literal["new", "resume", "complete", "replace"]


def job_identity(spec: JobSpec, input_sha256: str, num_lines: int, model: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": VERSION,
        "model": model,
        "input": {"sha256": input_sha256, "lines": num_lines, "format": spec.input_format},
        "dtype": spec.dtype,
        "tensor_parallel_size": spec.parallel.tensor_parallel_size,
        "sampling": spec.sampling.model_dump(),
        # Through EngineConfig so that an explicit default (seed: 0) equals an omitted one.
        "engine": {k: v for k, v in spec.engine_config().model_dump().items()
                   if k not in _OPERATIONAL and k not in ("model", "dtype", "parallel")},
        "chunk_size": spec.chunk_size,
    }


def fingerprint(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def components(identity: dict[str, Any]) -> dict[str, str]:
    """A digest per part of the job a rank reads for itself ("model file tokenizer.json", "input",
    "sampling", ...), so ranks that disagree can be told which file or setting differs."""
    def digest(value: Any) -> str:
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()

    model = dict(identity.get("model", {}))
    out = {"model file config.json": digest(model.pop("config_sha256", ""))}
    for group in ("safetensors", "files"):
        out.update({f"model file {name}": digest(d) for name, d in model.pop(group, {}).items()})
    if model:
        out["model"] = digest(model)
    out.update({key: digest(value) for key, value in identity.items() if key != "model"})
    return out


def load(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        raise JobError(f"{out / MANIFEST} is corrupt; remove it or pass --overwrite") from None


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Top-level names of what changed, e.g. ["input", "sampling.temperature"]."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict) and key in ("sampling", "engine"):
            diffs += [f"{key}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        else:
            diffs.append(key)
    return diffs


def check(out: Path, identity: dict[str, Any], overwrite: bool) -> State:
    """Decide what to do with OUT: start it, resume it, nothing (complete), or replace another job's.

    --overwrite replaces only a *different* job's output: the same job always resumes, so a requeue that
    repeats the command line, --overwrite included, never throws away finished chunks.
    """
    old = load(out)
    if old is None:
        return "new"
    if old.get("fingerprint") == fingerprint(identity):
        return "complete" if (out / SUCCESS).exists() else "resume"
    if overwrite:
        return "replace"
    what = ", ".join(differences(old.get("identity", {}), identity)) or "the manifest format"
    raise JobError(
        f"output directory {out} holds another job's results (different {what}); use a new --output "
        "to keep them, or pass --overwrite to replace them"
    )


def prepare(out: Path, identity: dict[str, Any], state: State) -> None:
    """Rank 0 only, before any rank writes a part."""
    if state == "replace":
        clear_outputs(out)
    if state in ("new", "replace"):
        # "created": the job's start, once for all ranks and reruns (OpenAI batch answers echo it).
        body = (json.dumps({"fingerprint": fingerprint(identity), "identity": identity,
                            "created": int(time.time())}, indent=2, default=str) + "\n").encode()
        if state == "replace":
            atomic_write(out / MANIFEST, body)
        elif not create_exclusive(out / MANIFEST, body):
            # Independent groups that start together: one manifest wins, and it must be this job's.
            check(out, identity, overwrite=False)
