"""The engine loop: schedule -> run the model -> post-process -> collect finished.

Every rank runs this same loop on the same requests; determinism of the scheduler and the seeded
sampler is what keeps the ranks of a TP group in lockstep.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from tprun.config import EngineConfig, SamplingParams
from tprun.engine.block_manager import BlockManager
from tprun.engine.scheduler import Scheduler
from tprun.engine.sequence import Sequence
from tprun.executor import EXECUTORS
from tprun.worker.step import SamplingOptions, StepInput


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.executor = EXECUTORS[config.distributed_executor_backend](config)
        worker = self.executor.worker
        self.max_model_len = worker.max_model_len
        self.eos_token_ids = _eos_ids(worker.hf_config, config.model)
        self.vocab_size = worker.hf_config.vocab_size
        num_blocks = self.executor.determine_num_available_blocks()
        self.executor.initialize_cache(num_blocks)
        self.scheduler = Scheduler(
            BlockManager(num_blocks, config.block_size), config.max_num_seqs,
            max(config.max_num_batched_tokens, self.max_model_len), self.max_model_len, self.vocab_size,
        )
        self._ids = itertools.count()
        self._finished_since_step: list[int] = []

    @property
    def num_blocks(self) -> int:
        return self.scheduler.block_manager.num_blocks

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, default_seed: int | None) -> Sequence:
        seq_id = next(self._ids)
        options = SamplingOptions(
            temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
            max_tokens=params.max_tokens, seed=params.seed if params.seed is not None else (
                default_seed if default_seed is not None else derive_seed(self.config.seed, seq_id)),
            stop_token_ids=frozenset(params.stop_token_ids), ignore_eos=params.ignore_eos,
        )
        seq = Sequence(seq_id, list(prompt_token_ids), options, self.eos_token_ids)
        self.scheduler.add(seq)  # a refused request finishes with an error, reported by the next step
        return seq

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[Sequence]:
        """Schedule, run the model, post-process; returns the sequences that finished."""
        batch = self.scheduler.schedule()
        finished, self.scheduler.finished_early = self.scheduler.finished_early, []
        if batch is None:
            if self.scheduler.has_unfinished() and not finished:
                raise RuntimeError("scheduler made no progress with requests pending (a bug)")
            return finished
        step = StepInput([s.step_input(n) for s, n in zip(batch.seqs, batch.num_new_tokens)],
                         batch.is_prefill, self._finished_since_step)
        self._finished_since_step = []
        token_ids = self.executor.execute_model(step)
        finished += self.scheduler.postprocess(batch, token_ids)
        self._finished_since_step += [s.seq_id for s in finished]
        return finished

    def shutdown(self) -> None:
        self.executor.shutdown()


def _eos_ids(hf_config, model_dir: str) -> frozenset[int]:
    """EOS ids from config.json and, as HF generate does, generation_config.json."""
    ids: set[int] = set()
    sources = [getattr(hf_config, "eos_token_id", None)]
    gen = Path(model_dir) / "generation_config.json"
    if gen.is_file():
        sources.append(json.loads(gen.read_text()).get("eos_token_id"))
    for eos in sources:
        if eos is not None:
            ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return frozenset(ids)


def derive_seed(base: int, index: int) -> int:
    """A request's seed when it has none: a fixed function of the engine seed and an index."""
    return (base * 1_000_003 + index * 7_919 + 12_345) % (2**31 - 1)
