"""`LLM`: the vLLM-compatible offline API. Same call on every rank; each rank gets the results."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any, Self

from tprun.config import EngineConfig, ParallelConfig, SamplingParams
from tprun.engine.llm_engine import LLMEngine
from tprun.engine.outputs import CompletionOutput, RequestOutput

PromptType = str | list[int] | dict[str, Any]


class LLM:
    def __init__(self, model: str, tensor_parallel_size: int = 1, data_parallel_size: int = 1,
                 dtype: str = "auto", seed: int = 0, distributed_executor_backend: str = "external_launcher",
                 tokenizer: str | None = None, **engine_kwargs: Any) -> None:
        self.config = EngineConfig(
            model=model, dtype=dtype, seed=seed, distributed_executor_backend=distributed_executor_backend,
            parallel=ParallelConfig(tensor_parallel_size=tensor_parallel_size,
                                    data_parallel_size=data_parallel_size),
            **engine_kwargs,
        )
        from transformers import AutoTokenizer

        self.llm_engine = LLMEngine(self.config)  # checks the model directory first, with a clear error
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or model, local_files_only=True)

    @property
    def dist(self):
        return self.llm_engine.executor.dist

    @property
    def max_model_len(self) -> int:
        return self.llm_engine.max_model_len

    def generate(self, prompts: PromptType | Seq[PromptType],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                 and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = (list(sampling_params) if isinstance(sampling_params, (list, tuple))
                  else [sampling_params] * len(prompts))
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts; give one or one each")
        engine = self.llm_engine
        seqs, texts = [], []
        for i, (prompt, sp) in enumerate(zip(prompts, params)):
            text, ids = self._tokenize(prompt)
            texts.append(text)
            seqs.append(engine.add_request(ids, sp, default_seed=derive_seed(self.config.seed, i)))
        bar = _progress(len(seqs), use_tqdm)
        while engine.has_unfinished():
            done = engine.step()
            if bar is not None and done:
                bar.update(len(done))
        if bar is not None:
            bar.close()
        return [self._output(i, text, seq) for i, (text, seq) in enumerate(zip(texts, seqs))]

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params=None, use_tqdm: bool = False):
        batch = messages if messages and isinstance(messages[0], list) else [messages]
        return self.generate([{"messages": m} for m in batch], sampling_params, use_tqdm)

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer(prompt).input_ids
        if isinstance(prompt, list):
            return None, [int(t) for t in prompt]
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
            if "messages" in prompt:
                ids = self.tokenizer.apply_chat_template(prompt["messages"], add_generation_prompt=True,
                                                         tokenize=True)
                if hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
                    ids = ids["input_ids"]
                return None, list(ids)
            if "prompt" in prompt:
                return self._tokenize(prompt["prompt"])
        raise TypeError(
            f"unsupported prompt {type(prompt).__name__}: give a string, a list of token ids, or a dict "
            "with 'prompt', 'prompt_token_ids' or 'messages'"
        )

    def _output(self, index: int, text: str | None, seq) -> RequestOutput:
        out = CompletionOutput(
            index=0, text=self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True),
            token_ids=list(seq.output_token_ids), finish_reason=seq.finish_reason, error=seq.error,
        )
        return RequestOutput(str(index), text, list(seq.prompt_token_ids), [out], finished=True)

    def shutdown(self) -> None:
        self.llm_engine.shutdown()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="requests", unit="req")


def derive_seed(base: int, index: int) -> int:
    """A request's seed when it has none: a fixed function of the engine seed and its index."""
    return (base * 1_000_003 + index * 7_919 + 12_345) % (2**31 - 1)
