"""Configuration at the edges: pydantic models for the engine, parallelism, sampling and job specs.

Inside the hot path the engine copies what it needs into plain dataclasses.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tprun.cluster.options import KubernetesOptions, Resources, SlurmOptions
from tprun.cluster.spec_rules import DNS1123_LABEL, Text

Dtype = Literal["auto", "float32", "float64", "bfloat16", "float16"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# vLLM's field is called `json`; it shadows pydantic's deprecated BaseModel.json(), which nothing here calls.
warnings.filterwarnings("ignore", message='Field name "json" in "StructuredOutputsParams" shadows')


class StructuredOutputsParams(_Strict):
    """Constrain a request's output (vLLM's names): give exactly one of the fields."""

    json: dict[str, Any] | str | None = Field(None, description="a JSON schema (object or its JSON text)")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = Field(None, description="an EBNF grammar (GBNF style, root rule 'root')")
    json_object: bool | None = Field(None, description="any JSON object")

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputsParams:
        given = [k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured_outputs needs exactly one of {', '.join(STRUCTURED_KINDS)}; "
                             f"got {', '.join(given) or 'none'}")
        if self.choice is not None and not self.choice:
            raise ValueError("structured_outputs.choice must list at least one string")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False))


STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")


class SamplingParams(_Strict):
    """vLLM-compatible sampling parameters. temperature 0 means greedy."""

    n: int = Field(1, ge=1, le=128, description="samples per prompt")
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, description="-1 or 0 disables top-k")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    max_tokens: int = Field(16, gt=0)
    min_tokens: int = Field(0, ge=0)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list, description="stop strings (a single string is accepted)")
    stop_token_ids: list[int] = Field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = Field(None, ge=0, le=20, description="top log-probs per generated token")
    prompt_logprobs: int | None = Field(None, ge=0, le=20, description="top log-probs per prompt token")
    logit_bias: dict[int, float] | None = Field(None, description="token id -> bias added to its logit")
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int) -> int:
        if v < -1:
            raise ValueError("top_k must be -1 (disabled), 0 (disabled) or a positive integer")
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        if v is None:
            return []
        return [v] if isinstance(v, str) else v

    @field_validator("stop", "bad_words")
    @classmethod
    def _non_empty_strings(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and any(s == "" for s in v):
            raise ValueError("must not contain an empty string")
        return v

    @field_validator("stop_token_ids", "allowed_token_ids")
    @classmethod
    def _token_ids(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(t < 0 for t in v):
            raise ValueError(f"token ids must be >= 0, got {min(v)}")
        return v

    @field_validator("allowed_token_ids")
    @classmethod
    def _allowed_non_empty(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and not v:
            raise ValueError("allowed_token_ids must list at least one token id (or be null)")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[int, float] | None) -> dict[int, float] | None:
        if v is None:
            return v
        for tok, bias in v.items():
            if tok < 0:
                raise ValueError(f"logit_bias token id {tok} must be >= 0")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias[{tok}] = {bias} must be in [-100, 100] (as OpenAI's API)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> SamplingParams:
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        return self


Groups = Literal["one-world", "independent"]


class ParallelConfig(_Strict):
    tensor_parallel_size: int = Field(1, ge=1)
    data_parallel_size: int = Field(1, ge=1)
    # "one-world": one rendezvous of tp x dp processes, chunks handed out through its store.
    # "independent": each TP group is a world of its own (a Slurm array task, a LeaderWorkerSet replica),
    # started and lost on its own; the groups share only OUT, where they claim chunks by lease files.
    groups: Groups = "one-world"

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.data_parallel_size


class EngineConfig(_Strict):
    model: str
    dtype: Dtype = "auto"
    seed: int = 0
    block_size: int = Field(16, ge=1)
    max_num_seqs: int = Field(256, ge=1)
    # Tokens one step computes, decodes and prompt chunks together: a longer prompt is split over steps.
    max_num_batched_tokens: int = Field(8192, ge=1)
    enable_prefix_caching: bool = True  # reuse the KV blocks of prompt prefixes seen before (vLLM's)
    # Schedule step N+1 while the device runs step N; sampled tokens reach the host one step later (vLLM's).
    async_scheduling: bool = True
    max_model_len: int | None = Field(None, ge=1)
    # Fraction of free device memory (CUDA) the KV cache may take; on CPU the budget is kv_cache_memory.
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    kv_cache_memory: int | None = Field(None, ge=1, description="bytes for the KV cache on this rank")
    num_gpu_blocks_override: int | None = Field(None, ge=1)
    enforce_eager: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    distributed_executor_backend: Literal["uni", "external_launcher"] = "external_launcher"
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    # Every this many steps the ranks of a TP group compare a hash of their sampled tokens (0: never).
    divergence_check_interval: int = Field(16, ge=0)
    dist_timeout_s: float = Field(300.0, gt=0)

    @field_validator("model")
    @classmethod
    def _model_dir(cls, v: str) -> str:
        return str(v)


MAX_NAME = 42
JOB_FIELD_FLAGS = {"model": "--model", "input": "--input", "output": "--output", "dtype": "--dtype",
                   "parallel": "--tp / --dp / --groups", "chunk_size": "--chunk-size", "on_bad_input": "--on-bad-input",
                   "sampling": "--max-tokens / --temperature / --top-p / --top-k"}


def validation_summary(e: Any, prefix: str = "") -> str:
    """A pydantic ValidationError as one line: 'field.path: message; ...'."""
    parts = []
    for err in e.errors():
        loc = prefix + ".".join(str(x) for x in err["loc"])
        msg = str(err["ctx"]["error"]) if err["type"] == "value_error" and "error" in err.get("ctx", {}) else err["msg"]
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


class JobSpec(_Strict):
    """What `tprun run|render|submit` take from a YAML file; CLI flags override fields."""

    name: Text = "tprun"
    model: Text
    input: Text
    output: Text
    dtype: Dtype = "auto"
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    engine: dict[str, Any] = Field(default_factory=dict, description="extra EngineConfig fields")
    resources: Resources = Field(default_factory=Resources)
    slurm: SlurmOptions = Field(default_factory=SlurmOptions)
    kubernetes: KubernetesOptions = Field(default_factory=KubernetesOptions)
    chunk_size: int = Field(64, ge=1, description="records per work chunk claimed by a TP group")
    # Independent groups: a chunk lease not renewed for this long (by the output filesystem's clock) is
    # taken over by another group. Long enough to outlast a slow filesystem, short enough to redo a lost
    # group's chunks soon.
    lease_timeout_s: float = Field(120.0, gt=0, description="independent groups: when a silent lease expires")
    on_bad_input: Literal["skip", "fail"] = "skip"
    # "auto": each input file's first line decides between tprun lines and OpenAI Batch API request lines.
    input_format: Literal["auto", "openai", "tprun"] = "auto"

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        # It names the Slurm job and the Kubernetes objects; pod hostnames '<name>-<index>' must fit 63.
        if len(v) > MAX_NAME or not DNS1123_LABEL.fullmatch(v):
            raise ValueError(f"{v!r} must be a DNS-1123 label of at most {MAX_NAME} characters (lower-case "
                             "letters, digits and '-', starting and ending with a letter or digit)")
        return v

    @field_validator("engine")
    @classmethod
    def _engine(cls, v: dict[str, Any]) -> dict[str, Any]:
        """Checked here, not when the engine starts: a bad key is a config error of the spec (exit 2)."""
        from pydantic import ValidationError

        for key in v:
            if key in cls.model_fields:
                flag = JOB_FIELD_FLAGS.get(key)
                raise ValueError(f"{key!r} is a job field, not an engine setting: set it as the spec's "
                                 f"'{key}:'{f' or with {flag}' if flag else ''}, not under engine (--engine)")
            if key not in EngineConfig.model_fields:
                raise ValueError(f"{key!r} is not an engine setting; the settings are "
                                 f"{', '.join(k for k in EngineConfig.model_fields if k not in cls.model_fields)}")
        try:
            EngineConfig.model_validate({"model": ".", **v})
        except ValidationError as e:
            raise ValueError(validation_summary(e)) from None
        return v

    def check(self) -> None:
        """What render and submit run before anything is written: the whole spec validated again (a list
        changed in place, or a model_construct()ed spec, skips pydantic), and tp * dp processes."""
        type(self).model_validate(self.model_dump())
        self.check_resources()

    def check_resources(self) -> None:
        """Render and submit need the resources to launch exactly tp * dp processes."""
        procs = self.resources.nodes * self.resources.processes_per_node
        if procs != self.parallel.world_size:
            raise ValueError(
                f"resources give {procs} processes (nodes({self.resources.nodes}) * procs_per_node"
                f"({self.resources.processes_per_node})) but parallel needs tp"
                f"({self.parallel.tensor_parallel_size}) * dp({self.parallel.data_parallel_size})"
                f" = {self.parallel.world_size}; set resources.nodes / resources.procs_per_node to match"
            )

    @classmethod
    def from_yaml(cls, path: str | Path) -> JobSpec:
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"job spec {path} does not exist") from None
        except yaml.YAMLError as e:
            raise ValueError(f"job spec {path} is not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(data, dict):
            raise ValueError(f"job spec {path} must be a YAML mapping, got {type(data).__name__}")
        return cls.model_validate(data)

    def engine_config(self) -> EngineConfig:
        return EngineConfig(model=self.model, dtype=self.dtype, parallel=self.group_parallel, **self.engine)

    @property
    def group_parallel(self) -> ParallelConfig:
        """The world one process joins: all groups, or with independent groups its own TP group only."""
        if self.parallel.groups == "one-world":
            return self.parallel
        return ParallelConfig(tensor_parallel_size=self.parallel.tensor_parallel_size, groups="independent")
