"""Scheduling one step ahead: the host launches step N+1 before it reads step N's tokens, and what a user
gets is exactly what the synchronous engine gives (float64, one process; the HF comparisons at TP=1/2 in
test_engine_hf.py run with it on, the default)."""

from __future__ import annotations

import pytest

from tprun import LLM, SamplingParams

# A cache too small for the batch (preemption), 16-token chunks, prefix caching, and requests ending at
# different steps for every reason a request can end.
ENGINE = {"dtype": "float64", "distributed_executor_backend": "uni", "block_size": 4,
          "num_gpu_blocks_override": 16, "max_num_batched_tokens": 16}


def _prompts(vocab: int) -> list[list[int]]:
    prefix = [(7 * i + 3) % vocab for i in range(13)]
    return [prefix + [(5 * i + j) % vocab for j in range(3 + i % 5)] for i in range(8)]


def _params(first_tokens: list[int]) -> list[SamplingParams]:
    """first_tokens: what request 1 generates without a stop (its 5th token becomes its stop token)."""
    return [
        SamplingParams(temperature=0, max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[first_tokens[4]]),
        SamplingParams(temperature=0.9, top_p=0.8, max_tokens=10, seed=3, n=3, logprobs=2),
        SamplingParams(temperature=0, max_tokens=6, prompt_logprobs=1, logprobs=0),
        SamplingParams(temperature=0.7, top_k=5, max_tokens=11, seed=4, repetition_penalty=1.3),  # waits
        SamplingParams(temperature=0, max_tokens=3),
        SamplingParams(temperature=0.8, min_p=0.1, max_tokens=8, seed=5, min_tokens=4, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=7, stop=["a"], include_stop_str_in_output=True),
    ]


def _summary(outs) -> list:
    return [[(c.token_ids, c.finish_reason, c.stop_reason,
              None if c.logprobs is None else [{t: round(lp.logprob, 9) for t, lp in pos.items()} for pos in c.logprobs])
             for c in o.outputs]
            + [None if o.prompt_logprobs is None else
               [p and {t: round(lp.logprob, 9) for t, lp in p.items()} for p in o.prompt_logprobs]]
            for o in outs]


@pytest.fixture(scope="module")
def runs(demo_model):
    """The same requests with scheduling ahead off and on, and the order of launches and results."""
    got = {}
    for ahead in (False, True):
        with LLM(model=str(demo_model), async_scheduling=ahead, **ENGINE) as llm:
            prompts = _prompts(llm.llm_engine.vocab_size)
            probe = llm.generate([prompts[1]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
            llm.reset_prefix_cache()
            events = _record_order(llm)
            outs = llm.generate(prompts, _params(probe[0].outputs[0].token_ids))
            mixed = list(events)
            events.clear()  # requests that need nothing from the host between steps
            plain = [(x, p) for x, p in zip(prompts, _params(probe[0].outputs[0].token_ids)) if not _waits(p)]
            llm.generate([x for x, _ in plain], [p for _, p in plain])
            got[ahead] = (_summary(outs), (mixed, list(events)), llm.llm_engine.scheduler.num_preemptions)
    return got


def _waits(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.min_tokens > 0


def _record_order(llm) -> list[str]:
    events: list[str] = []
    executor = llm.llm_engine.executor
    launch = executor.execute_model

    def traced(step):
        i = sum(e.startswith("launch") for e in events)
        events.append(f"launch {i}")
        sampled = launch(step)
        result = sampled.result

        def traced_result():
            if f"result {i}" not in events:
                events.append(f"result {i}")
            return result()

        sampled.result = traced_result
        return sampled

    executor.execute_model = traced
    return events


def test_outputs_equal_the_synchronous_engine(runs):
    sync, ahead = runs[False][0], runs[True][0]
    assert ahead == sync
    assert runs[False][2] > 0 and runs[True][2] > 0  # both runs preempted
    tokens = [c[0] for o in sync for c in o[:-1]]
    assert len({len(t) for t in tokens}) > 3  # requests ended at many different steps


def test_stops_return_no_token_past_them(runs):
    by_request = runs[True][0]
    stop_token = by_request[1][0]
    assert stop_token[1] == "stop" and stop_token[0][-1] == stop_token[2] and len(stop_token[0]) <= 5
    assert by_request[5][0][1] == "length" and len(by_request[5][0][0]) == 3


def test_the_host_launches_the_next_step_before_reading_the_last(runs):
    def ahead(events):
        steps = sum(e.startswith("launch") for e in events)
        return [events.index(f"launch {i + 1}") < events.index(f"result {i}") for i in range(steps - 1)]

    mixed, plain = runs[True][1]
    assert all(ahead(plain)) and len(plain) > 10
    # Rows with a repetition penalty or min_tokens need their history on the host: those steps wait.
    assert any(ahead(mixed)) and not all(ahead(mixed))
    for sync in runs[False][1]:
        assert sync == [e for i in range(len(sync) // 2) for e in (f"launch {i}", f"result {i}")]


@pytest.mark.parametrize("stop_at_last", [False, True])
def test_a_request_the_cache_cannot_hold_ends_as_without_scheduling_ahead(demo_model, stop_at_last):
    """Alone in a 16-block cache, a request grows until it cannot: its last token, still on the device when
    the cache runs out, is returned (or stops it) before the request fails, exactly as in the synchronous
    engine."""
    prompt = list(range(5, 25))
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    got = {}
    for ahead in (False, True):
        with LLM(model=str(demo_model), async_scheduling=ahead, **ENGINE) as llm:
            if stop_at_last and not got:
                full = llm.generate([prompt], params)[0].outputs[0].token_ids
                params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True, stop_token_ids=[full[-1]])
            out = llm.generate([prompt], params)[0].outputs[0]
            got[ahead] = (out.token_ids, out.finish_reason, out.stop_reason)
    assert got[True] == got[False]
    assert got[False][1] == ("stop" if stop_at_last else "error")
