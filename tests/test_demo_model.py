"""`make_demo_model`: a deterministic tiny checkpoint that transformers loads offline, tokenizer included."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open
from transformers import AutoTokenizer

from tprun.demo_model import DEMO_ARCHS, make_demo_model

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}


def config_of(model_dir) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def tensor_names(model_dir) -> set[str]:
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return set(f.keys())


def test_same_seed_writes_identical_files_and_another_seed_other_weights(tmp_path):
    a, b = make_demo_model(tmp_path / "a", seed=5), make_demo_model(tmp_path / "b", seed=5)
    c = make_demo_model(tmp_path / "c", seed=6)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


@pytest.mark.parametrize("arch", DEMO_ARCHS)
def test_each_arch_writes_its_architecture(tmp_path, arch):
    config = config_of(make_demo_model(tmp_path, arch=arch))
    assert config["architectures"] == [ARCHITECTURES[arch]]
    assert config["vocab_size"] % 2 == 1, "an odd vocabulary makes TP=2 exercise vocab padding"
    assert config["num_key_value_heads"] < config["num_attention_heads"], "GQA"


def test_tokenizer_loads_offline_and_round_trips_text(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_dir = make_demo_model(tmp_path)
    config = config_of(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert len(tok) == config["vocab_size"]
    text = "The sea is wide, and 42 ranks add their partial sums."
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id == config["bos_token_id"]
    assert tok.eos_token_id == config["eos_token_id"] != tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_chat_template_renders_messages_with_a_generation_prompt(tmp_path):
    tok = AutoTokenizer.from_pretrained(make_demo_model(tmp_path))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|bos|><|system|>\nBe brief.<|eos|>\n<|user|>\nHi!<|eos|>\n<|assistant|>\n"
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_config_overrides_reach_the_checkpoint(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    model_dir = make_demo_model(
        tmp_path, arch="llama", num_key_value_heads=1, tie_word_embeddings=True, rope_parameters=rope
    )
    config = config_of(model_dir)
    assert config["num_key_value_heads"] == 1 and config["tie_word_embeddings"] is True
    assert config["rope_parameters"] == rope
    names = tensor_names(model_dir)
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    assert {n for n in names if "k_proj.weight" in n}, "k_proj must exist"


def test_norms_and_biases_are_random_not_the_init_constants(tmp_path):
    model_dir = make_demo_model(tmp_path, arch="qwen2")
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        bias = f.get_tensor("model.layers.0.self_attn.k_proj.bias")
        norm = f.get_tensor("model.layers.0.input_layernorm.weight")
    assert bias.std() > 0.05 and (norm - 1).std() > 0.05


def test_max_shard_size_writes_an_index_and_shards(tmp_path):
    model_dir = make_demo_model(tmp_path, max_shard_size="20KB")
    weight_map = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert all((model_dir / f).is_file() for f in weight_map.values())
    assert len(set(weight_map.values())) > 1 and not (model_dir / "model.safetensors").exists()


def test_unknown_arch_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown demo architecture 'gpt2'.*llama, mistral, qwen2, qwen3, mixtral"):
        make_demo_model(tmp_path, arch="gpt2")
