"""`LLM`: the vLLM-compatible offline API. Same call on every rank; each rank gets the results."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any, Self

from tprun.config import EngineConfig, ParallelConfig, SamplingParams
from tprun.engine.llm_engine import LLMEngine, load_tokenizer
from tprun.engine.outputs import RequestOutput
from tprun.engine.request_output import PendingRequest, TokenText, request_output

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
        # The engine checks the model directory first, with a clear error; it owns the tokenizer (stop
        # strings and bad words need it on every rank).
        self.llm_engine = LLMEngine(self.config, load_tokenizer(tokenizer) if tokenizer else None)
        self.tokenizer = self.llm_engine.tokenizer
        self._token_text = TokenText(self.tokenizer)
        self._pending: dict[int, PendingRequest] = {}  # seq id -> its request (n > 1: one request, n seq ids)
        self._generate_calls = 0
        self._carried: list[RequestOutput] = []

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
        ids = [f"{self._generate_calls}-{i}" for i in range(len(prompts))]
        self._generate_calls += 1
        for rid, prompt, sp in zip(ids, prompts, params):
            # Without a seed a request's seed derives from its arrival number over the LLM's life, so a
            # second generate() call draws new samples (as vLLM), the same on every rank.
            self._add(rid, prompt, sp)
        bar = _progress(len(ids), use_tqdm)
        done: dict[str, RequestOutput] = {}
        mine = set(ids)
        while len(done) < len(ids):
            finished = self.step()
            for o in finished:
                if o.request_id in mine:
                    done[o.request_id] = o
                else:  # a streamed request (add_request): the caller's next step() returns it
                    self._carried.append(o)
            if bar is not None and finished:
                bar.update(len(finished))
        if bar is not None:
            bar.close()
        return [done[rid] for rid in ids]

    # -- streaming: keep the batch full across many submissions (the job runner does) -----------
    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams) -> None:
        """Queue one request; its output comes back from a later step(). Without a seed in `params`
        the request's seed derives from the engine seed and its arrival number."""
        self._add(request_id, prompt, params)

    def step(self) -> list[RequestOutput]:
        """One engine step; returns the requests that finished in it (arrival order of their last sample)."""
        carried, self._carried = self._carried, []
        done = []
        for seq in self.llm_engine.step():
            request = self._pending.pop(seq.seq_id)
            request.finished.append(seq)
            if len(request.finished) == request.params.n:
                done.append(request_output(request, self.tokenizer, self._token_text))
        return carried + done

    def reset_prefix_cache(self) -> None:
        """Forget every cached prompt block (vLLM's); the blocks return to the free pool."""
        self.llm_engine.scheduler.block_manager.reset_prefix_cache()

    def has_unfinished_requests(self) -> bool:
        return bool(self._pending or self._carried)

    def _add(self, request_id: str, prompt: PromptType, params: SamplingParams) -> None:
        text, ids = self._tokenize(prompt)
        request = PendingRequest(request_id, text, params)
        for seq in self.llm_engine.add_request(ids, params, default_seed=None):
            self._pending[seq.seq_id] = request

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

