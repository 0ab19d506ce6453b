"""The engine loop: schedule -> run the model -> post-process -> collect finished.

Every rank runs this same loop on the same requests; determinism of the scheduler and the seeded
sampler is what keeps the ranks of a TP group in lockstep.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

from tprun.config import EngineConfig, SamplingParams
from tprun.engine.block_manager import BlockManager
from tprun.engine.request_options import RequestError, sampling_options
from tprun.engine.scheduler import ScheduledBatch, Scheduler
from tprun.engine.sequence import Sequence
from tprun.engine.stop_strings import StopStringChecker
from tprun.executor import EXECUTORS
from tprun.worker.sampled_step import SampledStep
from tprun.worker.step import SamplingOptions, StepInput

# The options of a request refused before its options could be built: it never reaches the worker.
_REFUSED = SamplingOptions(temperature=0.0, top_p=1.0, top_k=-1, max_tokens=1, seed=0,
                           stop_token_ids=frozenset(), ignore_eos=False)


@dataclass
class InFlight:
    """A launched step whose tokens have not reached the host yet."""

    batch: ScheduledBatch
    sampled: SampledStep


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer=None) -> None:
        self.config = config
        self.executor = EXECUTORS[config.distributed_executor_backend](config)
        worker = self.executor.worker
        self.max_model_len = worker.max_model_len
        self.eos_token_ids = _eos_ids(worker.hf_config, config.model)
        self.vocab_size = worker.hf_config.vocab_size
        num_blocks = self.executor.determine_num_available_blocks()
        self.executor.initialize_cache(num_blocks)
        self.scheduler = Scheduler(
            BlockManager(num_blocks, config.block_size, config.enable_prefix_caching), config.max_num_seqs,
            config.max_num_batched_tokens, self.max_model_len, self.vocab_size,  # longer prompts are chunked
        )
        self._ids = itertools.count()
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model)
        self._structured = None
        self._inflight: InFlight | None = None

    @property
    def num_blocks(self) -> int:
        return self.scheduler.block_manager.num_blocks

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams,
                    default_seed: int | None) -> list[Sequence]:
        """Queue one request: `params.n` sibling sequences (sample i > 0 seeded from the request's seed and
        i). A request the engine refuses finishes with an error, reported by the next step."""
        first = next(self._ids)
        seed = params.seed if params.seed is not None else (
            default_seed if default_seed is not None else derive_seed(self.config.seed, first))
        seqs = []
        for i in range(params.n):
            seq_id = first if i == 0 else next(self._ids)
            try:
                options, problem = sampling_options(params, seed if i == 0 else derive_seed(seed, i),
                                                    self.vocab_size, self.eos_token_ids, self.tokenizer), None
            except RequestError as e:
                options, problem = _REFUSED, str(e)
            seq = Sequence(seq_id, list(prompt_token_ids), options, self.eos_token_ids)
            seqs.append(seq)
            if problem is not None:
                seq.finish("error", problem)
                self.scheduler.finished_early.append(seq)
                continue
            if params.stop:
                seq.stop_checker = StopStringChecker(self.tokenizer, seq.prompt_token_ids, tuple(params.stop),
                                                     params.include_stop_str_in_output,
                                                     params.skip_special_tokens, params.min_tokens)
            if params.structured_outputs is not None:
                seq.grammar = self.structured_outputs.submit(params.structured_outputs)
            self.scheduler.add(seq)
        return seqs

    @property
    def structured_outputs(self):
        if self._structured is None:  # the grammar library loads only for jobs that use it
            from tprun.engine.structured_outputs import StructuredOutputManager

            self._structured = StructuredOutputManager(self.tokenizer, self.vocab_size, self.eos_token_ids)
        return self._structured

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None

    def step(self) -> list[Sequence]:
        """Schedule and launch a step, then bring in the previous step's tokens (scheduling ahead: the
        host prepares this step while the device still runs the last one); returns the sequences that
        finished. The host is one step behind except after a step with rows that need their history (then
        it waits before scheduling): both are decided from the batches alone, never from the device's pace."""
        self._resolve_grammars()
        finished: list[Sequence] = []
        prev, self._inflight = self._inflight, None
        if prev is not None and self._must_wait(prev.batch):
            finished += self._resolve(prev)
            prev = None
        batch = self.scheduler.schedule()
        early, self.scheduler.finished_early = self.scheduler.finished_early, []
        if batch is not None:
            self._inflight = InFlight(batch, self._launch(batch, prev.batch if prev is not None else None))
            if not self.config.async_scheduling:
                finished += self._resolve(self._inflight)
                self._inflight = None
        if prev is not None:
            finished += self._resolve(prev)
        if batch is None and prev is None and self.scheduler.has_unfinished() and not early and not finished:
            raise RuntimeError("scheduler made no progress with requests pending (a bug)")
        return early + finished

    def _must_wait(self, batch: ScheduledBatch) -> bool:
        """Rows whose next step needs their last token on the host (its grammar state for the mask, or
        the output history for penalties, bad words and min_tokens) make the next step wait for it; so does
        everything when scheduling ahead was switched off since that step was launched."""
        return not self.config.async_scheduling or any(
            sample and (s.matcher is not None or s.sampling.needs_history)
            for s, sample in zip(batch.seqs, batch.sample))

    def _launch(self, batch: ScheduledBatch, prev: ScheduledBatch | None) -> SampledStep:
        """Build the step (rows fed by the in-flight step read its tokens on the device) and launch it."""
        prev_rows = {} if prev is None else {s.seq_id: i for i, (s, sample) in enumerate(zip(prev.seqs, prev.sample))
                                             if sample}
        seqs = [s.step_input(n, sample, prev_rows.get(s.seq_id, -1))
                for s, n, sample in zip(batch.seqs, batch.num_new_tokens, batch.sample)]
        bitmask, rows = self._bitmask(batch)
        sampled = self.executor.execute_model(StepInput(seqs, batch.is_prefill, bitmask, rows))
        self.scheduler.commit(batch)
        batch.grammar_rows = rows
        return sampled

    def _resolve(self, inflight: InFlight) -> list[Sequence]:
        out = inflight.sampled.result()
        self._accept_grammar(inflight.batch, inflight.batch.grammar_rows, out.token_ids)
        return self.scheduler.resolve(inflight.batch, out)

    def _resolve_grammars(self) -> None:
        """Structured-output requests compile in the background from the moment they arrive; one is
        waited for only when it may be scheduled (the queue's head), so the decision to wait never
        depends on how fast a compile was, and every rank makes it at the same step."""
        head = list(itertools.islice(self.scheduler.waiting, self.config.max_num_seqs))
        for seq in head:
            if seq.grammar is None or seq.matcher is not None:
                continue
            from tprun.engine.structured_outputs import StructuredOutputError

            try:
                compiled = seq.grammar.result(timeout=self.config.dist_timeout_s)
            except StructuredOutputError as e:
                self.scheduler.waiting.remove(seq)
                seq.finish("error", f"structured_outputs: {e}")
                self.scheduler.finished_early.append(seq)
                continue
            seq.matcher = self.structured_outputs.new_matcher(compiled)

    def _accept_grammar(self, batch, rows: list[int], token_ids: list[int]) -> None:
        """The structured rows' sampled tokens advance their grammars (one call for the batch); the rows
        are those that had a mask, i.e. exactly those that sampled under a grammar."""
        if rows:
            taken = self.structured_outputs.accept_tokens([batch.seqs[i].matcher for i in rows],
                                                          [token_ids[i] for i in rows])
            for i, ok in zip(rows, taken):
                batch.seqs[i].grammar_accepted = ok

    def _bitmask(self, batch):
        """The step's structured-output rows, and a function that fills their masks: the worker calls it
        once the model's forward pass is launched, so on a GPU the host fills masks while the GPU runs."""
        if any(s.grammar is not None and s.matcher is None for s in batch.seqs):
            raise RuntimeError("a structured-output request was scheduled before its grammar (a bug)")
        rows = [i for i, (s, sample) in enumerate(zip(batch.seqs, batch.sample))
                if sample and s.matcher is not None]
        if not rows:
            return None, []
        matchers = [batch.seqs[i].matcher for i in rows]
        return (lambda: self.structured_outputs.fill_bitmasks(matchers)), rows

    def shutdown(self) -> None:
        if self._inflight is not None:  # its collectives must end before the process group does
            self._inflight.sampled.wait()
            self._inflight = None
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


def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
