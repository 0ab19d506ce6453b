"""Loading HF safetensors checkpoints: per-rank slices, sharded checkpoints, and clear errors for bad files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from tprun.demo_model import make_demo_model
from tprun.worker.models import build_model, load_model
from tprun.worker.parallel import TPGroup

CPU = torch.device("cpu")


def load(model_dir, tp: TPGroup | None = None, config=None):
    config = config or AutoConfig.from_pretrained(model_dir)
    return load_model(str(model_dir), config, tp or TPGroup(), torch.float64, CPU)


@pytest.fixture(scope="module")
def mqa_dir(tmp_path_factory):
    """One KV head (replicated at TP=2) and an odd vocabulary (padded at TP=2)."""
    return make_demo_model(tmp_path_factory.mktemp("mqa"), arch="qwen2", num_key_value_heads=1)


@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_holds_its_slice_of_every_weight(mqa_dir, rank):
    config = AutoConfig.from_pretrained(mqa_dir)
    full = {k: v.double() for k, v in load_file(mqa_dir / "model.safetensors").items()}
    params = dict(load(mqa_dir, TPGroup(rank=rank, size=2), config).named_parameters())
    hd, hidden, inter, vocab = 16, 64, 128, config.vocab_size
    assert (config.num_attention_heads, config.num_key_value_heads, vocab % 2) == (4, 1, 1)

    def heads(t, first, n):  # rows of heads [first, first + n)
        return t[first * hd : (first + n) * hd]

    layer = "model.layers.1."
    q, k, v = (full[f"{layer}self_attn.{p}_proj.weight"] for p in "qkv")
    # 4 query heads -> 2 per rank; the single KV head is replicated on both ranks.
    expected_qkv = torch.cat([heads(q, 2 * rank, 2), heads(k, 0, 1), heads(v, 0, 1)])
    assert torch.equal(params[f"{layer}self_attn.qkv_proj.weight"], expected_qkv)
    qb, kb, vb = (full[f"{layer}self_attn.{p}_proj.bias"] for p in "qkv")
    expected_bias = torch.cat([heads(qb, 2 * rank, 2), heads(kb, 0, 1), heads(vb, 0, 1)])
    assert torch.equal(params[f"{layer}self_attn.qkv_proj.bias"], expected_bias)
    o = full[f"{layer}self_attn.o_proj.weight"]
    assert torch.equal(params[f"{layer}self_attn.o_proj.weight"], o[:, rank * 32 : (rank + 1) * 32])

    half = inter // 2
    gate, up = full[f"{layer}mlp.gate_proj.weight"], full[f"{layer}mlp.up_proj.weight"]
    rows = slice(rank * half, (rank + 1) * half)
    assert torch.equal(params[f"{layer}mlp.gate_up_proj.weight"], torch.cat([gate[rows], up[rows]]))
    down = full[f"{layer}mlp.down_proj.weight"]
    assert torch.equal(params[f"{layer}mlp.down_proj.weight"], down[:, rows])
    assert torch.equal(params[f"{layer}input_layernorm.weight"], full[f"{layer}input_layernorm.weight"])

    per_rank = (vocab + 1) // 2
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        shard = params[name]
        assert shard.shape == (per_rank, hidden)
        real = full[name][rank * per_rank : (rank + 1) * per_rank]
        assert torch.equal(shard[: len(real)], real)
        assert not shard[len(real) :].any(), "vocabulary padding rows must be zero"


def test_sharded_checkpoint_loads_the_same_weights_as_a_single_file(tmp_path):
    single = make_demo_model(tmp_path / "single", arch="qwen3", seed=4)
    sharded = make_demo_model(tmp_path / "sharded", arch="qwen3", seed=4, max_shard_size="20KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    a, b = load(single).state_dict(), load(sharded).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    model_dir = make_demo_model(tmp_path)
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json"):
        load(model_dir)


def test_missing_shard_error_names_the_file(tmp_path):
    model_dir = make_demo_model(tmp_path, max_shard_size="20KB")
    (model_dir / "model-00002-of-00014.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00014.safetensors"):
        load(model_dir)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors_error_names_the_file(tmp_path, damage):
    model_dir = make_demo_model(tmp_path)
    path = model_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100] if damage == "truncated" else b"not a safetensors file")
    with pytest.raises(ValueError, match=f"cannot read checkpoint file {path}.*corrupt or truncated"):
        load(model_dir)


def test_checkpoint_lacking_a_weight_names_it(tmp_path):
    model_dir = make_demo_model(tmp_path)
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks weights .*model\.layers\.1\.self_attn\.qkv_proj\.weight"):
        load(model_dir)


def test_checkpoint_not_matching_the_config_names_the_tensor(tmp_path):
    model_dir = make_demo_model(tmp_path)
    config = AutoConfig.from_pretrained(model_dir)
    config.intermediate_size = 96
    pattern = r"model\.layers\.0\.mlp\.\w+_proj\.weight.*shape \(\d+, \d+\) differs from the .*96.* model config"
    with pytest.raises(ValueError, match=pattern):
        load(model_dir, config=config)


def test_checkpoint_of_another_architecture_names_the_stray_tensor(tmp_path):
    model_dir = make_demo_model(tmp_path, arch="qwen3")  # has q_norm / k_norm
    config = AutoConfig.from_pretrained(model_dir)
    config.architectures = ["LlamaForCausalLM"]
    with pytest.raises(ValueError, match=r"self_attn\.[qk]_norm\.weight.*has no place in the model"):
        load(model_dir, config=config)


def test_built_model_has_the_requested_dtype_and_device(tmp_path):
    config = AutoConfig.from_pretrained(make_demo_model(tmp_path))
    model = build_model(config, TPGroup(), torch.bfloat16, CPU)
    assert {(p.dtype, p.device) for p in model.parameters()} == {(torch.bfloat16, CPU)}
    assert torch.get_default_dtype() == torch.float32, "build_model must restore the default dtype"
