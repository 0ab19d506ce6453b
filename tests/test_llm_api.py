"""The Python API's contract for bad requests and bad models (one process, world of 1)."""

from __future__ import annotations

import json

import pytest

from tprun import LLM, SamplingParams


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from tprun.demo_model import make_demo_model

    return str(make_demo_model(tmp_path_factory.mktemp("api") / "m", arch="qwen3", seed=5))


@pytest.fixture(scope="module")
def llm(model_dir):
    with LLM(model=model_dir, dtype="float32", distributed_executor_backend="uni") as engine:
        yield engine


def test_prompt_longer_than_the_model_allows_errors_while_the_others_complete(llm):
    too_long = [9] * (llm.max_model_len + 5)
    outs = llm.generate([[9, 10, 11], too_long, "Hello"], SamplingParams(temperature=0, max_tokens=4))
    assert [o.outputs[0].finish_reason for o in outs] == ["length", "error", "length"]
    assert f"at most {llm.max_model_len}" in outs[1].outputs[0].error
    assert outs[1].outputs[0].token_ids == []
    assert len(outs[0].outputs[0].token_ids) == len(outs[2].outputs[0].token_ids) == 4


def test_token_ids_outside_the_vocabulary_are_an_error(llm):
    vocab = llm.llm_engine.vocab_size
    out = llm.generate([[1, vocab + 3]], SamplingParams(max_tokens=2))[0].outputs[0]
    assert out.finish_reason == "error" and f"outside the vocabulary [0, {vocab})" in out.error


def test_outputs_come_back_in_input_order_for_every_prompt_form(llm):
    prompts = ["a b c", [7, 8, 9, 10], {"prompt": "x"}, {"prompt_token_ids": [5, 6]},
               {"messages": [{"role": "user", "content": "hi"}]}]
    params = SamplingParams(temperature=0, max_tokens=3)
    together = llm.generate(prompts, params)
    alone = [llm.generate([p], params)[0] for p in prompts]
    assert [o.outputs[0].token_ids for o in together] == [o.outputs[0].token_ids for o in alone]
    assert together[1].prompt_token_ids == [7, 8, 9, 10]


def test_stop_token_ids_end_generation_with_stop(llm):
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    first = llm.generate([[20, 21, 22]], params)[0].outputs[0].token_ids
    stop_at = first[2]
    out = llm.generate([[20, 21, 22]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                                      stop_token_ids=[stop_at]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids == first[: first.index(stop_at) + 1]


def _with_config(model_dir: str, tmp_path, **changes) -> str:
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg.update(changes)
    (copy / "config.json").write_text(json.dumps(cfg))
    return str(copy)


def test_unsupported_architecture_error_lists_the_supported_ones(model_dir, tmp_path):
    bad = _with_config(model_dir, tmp_path, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match=r"unsupported model architecture GPT2LMHeadModel.*LlamaForCausalLM.*"
                                         r"Qwen3ForCausalLM"):
        LLM(model=bad, distributed_executor_backend="uni")


def test_tp_size_not_dividing_the_heads_names_both_numbers(model_dir):
    heads = json.loads(open(f"{model_dir}/config.json").read())["num_attention_heads"]
    with pytest.raises(ValueError, match=rf"num_attention_heads \({heads}\).*tensor-parallel size \(3\)"):
        LLM(model=model_dir, tensor_parallel_size=3)


def test_missing_model_directory_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        LLM(model=str(tmp_path / "nope"), distributed_executor_backend="uni")
