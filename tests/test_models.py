"""Every supported family at TP=1 gives transformers' logits (float64, CPU), with and without a paged KV cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from tests.model_harness import (
    hf_logits,
    load_hf,
    make_mxfp4_gpt_oss,
    paged_logits,
    prefill_logits_without_cache,
    sequences,
)
from tprun.demo_model import DEMO_ARCHS, make_demo_model
from tprun.worker.layers.moe import topk_by_index
from tprun.worker.models import SUPPORTED_ARCHITECTURES, build_model, check_supported, load_model
from tprun.worker.parallel import TPGroup

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parent.parent


def load_both(model_dir):
    """(tprun model at TP=1, transformers model), both float64."""
    hf = load_hf(str(model_dir))
    ours = load_model(str(model_dir), hf.config, TPGroup(), torch.float64, CPU)
    return ours, hf


def assert_matches_hf(ours, hf, got: list[torch.Tensor], seqs: list[list[int]]) -> None:
    for logits, seq in zip(got, seqs, strict=True):
        assert logits.shape == (len(seq), hf.config.vocab_size)
        torch.testing.assert_close(logits, hf_logits(hf, seq), rtol=0, atol=1e-10)


@pytest.fixture(scope="module", params=DEMO_ARCHS)
def arch_models(request, tmp_path_factory):
    return load_both(make_demo_model(tmp_path_factory.mktemp(request.param), arch=request.param, seed=1))


def test_prefill_logits_match_hf_float64(arch_models):
    ours, hf = arch_models
    seqs = sequences(hf.config.vocab_size, (12, 5))
    assert_matches_hf(ours, hf, prefill_logits_without_cache(ours, seqs), seqs)


def test_paged_prefill_chunks_and_decode_match_hf_float64(arch_models):
    ours, hf = arch_models
    seqs = sequences(hf.config.vocab_size)
    assert_matches_hf(ours, hf, paged_logits(ours, seqs), seqs)


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [
        pytest.param(
            "llama",
            {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 64}},
            id="llama3-rope-scaling",
        ),
        pytest.param("qwen2", {"tie_word_embeddings": True}, id="tied-embeddings"),
        pytest.param("mistral", {"sliding_window": 4}, id="sliding-window"),
        pytest.param("llama", {"num_key_value_heads": 1, "attention_bias": True, "mlp_bias": True}, id="mqa-biases"),
        # Every fed chunk is longer than original_max_position_embeddings: the long factors throughout.
        pytest.param("phi3", {"rope_parameters": {
            "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "factor": 4.0,
            "original_max_position_embeddings": 3, "short_factor": [1.0, 1.1, 1.3, 1.6],
            "long_factor": [1.5, 2.0, 3.0, 4.5]}}, id="phi3-longrope-long-factors"),
        pytest.param("gemma3", {"rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}}},
            id="gemma3-scaled-global-rope"),
        pytest.param("qwen2_moe", {"norm_topk_prob": True, "decoder_sparse_step": 2, "num_key_value_heads": 1},
                     id="qwen2-moe-sparse-step-mqa"),
        pytest.param("mixtral", {"max_shard_size": "20KB", "sliding_window": 4}, id="mixtral-sharded-window"),
    ],
)
def test_config_variants_match_hf_float64(arch, overrides, tmp_path):
    ours, hf = load_both(make_demo_model(tmp_path, arch=arch, seed=2, **overrides))
    seqs = sequences(hf.config.vocab_size)
    assert_matches_hf(ours, hf, paged_logits(ours, seqs), seqs)


def test_tied_lm_head_shares_the_embedding(tmp_path):
    ours, _ = load_both(make_demo_model(tmp_path, arch="llama", tie_word_embeddings=True))
    assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_attention_layers_describe_the_kv_cache_per_rank(tmp_path):
    config = AutoConfig.from_pretrained(make_demo_model(tmp_path, arch="qwen3", num_key_value_heads=1))
    model = build_model(config, TPGroup(rank=1, size=2), torch.float32, CPU)
    layers = model.attention_layers
    assert len(layers) == config.num_hidden_layers
    assert all((a.num_kv_heads, a.head_dim, a.k_cache) == (1, config.head_dim, None) for a in layers)


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    config = AutoConfig.from_pretrained(make_demo_model(tmp_path))
    config.architectures = ["GPT2LMHeadModel"]
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as err:
        build_model(config, TPGroup(), torch.float32, CPU)
    assert all(arch in str(err.value) for arch in SUPPORTED_ARCHITECTURES)


def test_tp_size_not_dividing_attention_heads_names_both_numbers(tmp_path):
    config = AutoConfig.from_pretrained(make_demo_model(tmp_path))  # 4 attention heads
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\).*tensor-parallel size \(3\)"):
        build_model(config, TPGroup(rank=0, size=3), torch.float32, CPU)


def test_kv_heads_that_cannot_be_replicated_evenly_are_a_clear_error(tmp_path):
    config = AutoConfig.from_pretrained(make_demo_model(tmp_path))
    config.num_attention_heads, config.num_key_value_heads = 12, 3  # TP=4: 3 KV heads over 4 ranks
    with pytest.raises(ValueError, match=r"num_key_value_heads \(3\).*tensor-parallel size \(4\)"):
        build_model(config, TPGroup(rank=0, size=4), torch.float32, CPU)


def test_unsupported_checkpoints_are_refused_before_any_rendezvous(tmp_path):
    """check_supported runs on config.json alone, before the process group exists, and names the numbers."""
    moe = AutoConfig.from_pretrained(make_demo_model(tmp_path / "moe", arch="qwen3_moe", moe_intermediate_size=34))
    with pytest.raises(ValueError, match=r"moe_intermediate_size \(34\).*tensor-parallel size \(4\)"):
        check_supported(moe, 4)
    check_supported(moe, 2)  # 5 experts over 2 ranks is fine: every rank holds every expert
    dense = AutoConfig.from_pretrained(make_demo_model(tmp_path / "gemma", arch="gemma2", intermediate_size=98))
    with pytest.raises(ValueError, match=r"intermediate_size \(98\).*tensor-parallel size \(4\)"):
        check_supported(dense, 4)
    dense.intermediate_size, dense.num_attention_heads, dense.num_key_value_heads = 128, 12, 3
    with pytest.raises(ValueError, match=r"num_key_value_heads \(3\).*tensor-parallel size \(4\)"):
        check_supported(dense, 4)
    mixtral = AutoConfig.from_pretrained(make_demo_model(tmp_path / "mixtral", arch="mixtral"))
    mixtral.quantization_config = {"quant_method": "mxfp4"}
    with pytest.raises(ValueError, match="mxfp4 quantized checkpoints are not supported for MixtralForCausalLM"):
        check_supported(mixtral, 1)


def test_routing_ties_go_to_the_lower_expert_index():
    scores = torch.tensor([[0.1, 0.3, 0.3, 0.2, 0.3], [0.5, 0.5, 0.5, 0.5, 0.5]], dtype=torch.float64)
    values, ids = topk_by_index(scores, 2)
    assert ids.tolist() == [[1, 2], [0, 1]]
    assert values.tolist() == [[0.3, 0.3], [0.5, 0.5]]


def test_tp2_logits_match_hf_float64_under_torchrun(tmp_path):
    """Real torchrun, 2 ranks over gloo: q/k/v and gate/up split by columns, o/down by rows (bias added
    once), vocab padded (331 tokens), KV heads split (2 over 2 ranks) and replicated (1 over 2 ranks);
    experts (3 and 5 of them) each split over both ranks, fused Phi-3 and gpt-oss tensors sliced per rank,
    gpt-oss's sinks split with the heads."""
    models = [
        make_demo_model(tmp_path / "llama", arch="llama", seed=3),
        make_demo_model(tmp_path / "llama-mqa", arch="llama", seed=3, num_key_value_heads=1,
                        tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
        make_demo_model(tmp_path / "mistral", arch="mistral", seed=3, sliding_window=4),
        make_demo_model(tmp_path / "qwen2", arch="qwen2", seed=3, num_key_value_heads=1),
        make_demo_model(tmp_path / "qwen3", arch="qwen3", seed=3),
        *(make_demo_model(tmp_path / arch, arch=arch, seed=3)
          for arch in ("mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "gemma2", "gemma3", "phi3")),
        "::".join(map(str, make_mxfp4_gpt_oss(tmp_path / "gpt_oss_mxfp4", seed=3))),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tests" / "model_tp_check.py"), *map(str, models)]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for rank in (0, 1):
        for model in models:
            assert f"[ok rank={rank} model={model}]" in proc.stdout


def test_experts_stacked_as_transformers_5_names_them_load_too(tmp_path):
    """mlp.experts.gate_up_proj [E, 2I, H] and down_proj [E, H, I] instead of one tensor per expert."""
    from safetensors.torch import load_file, save_file

    model_dir = make_demo_model(tmp_path, arch="qwen3_moe", seed=4)
    ours_per_expert, hf = load_both(model_dir)
    tensors = load_file(str(model_dir / "model.safetensors"))
    prefix, num_experts = "model.layers.1.mlp.experts", hf.config.num_experts
    experts = [{p: tensors.pop(f"{prefix}.{e}.{p}.weight") for p in ("gate_proj", "up_proj", "down_proj")}
               for e in range(num_experts)]
    tensors[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat((x["gate_proj"], x["up_proj"])) for x in experts])
    tensors[f"{prefix}.down_proj"] = torch.stack([x["down_proj"] for x in experts])
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    ours = load_model(str(model_dir), hf.config, TPGroup(), torch.float64, CPU)
    seqs = sequences(hf.config.vocab_size)
    assert_matches_hf(ours, hf, paged_logits(ours, seqs), seqs)
    assert torch.equal(ours.model.layers[1].mlp.experts.gate_up_proj,
                       ours_per_expert.model.layers[1].mlp.experts.gate_up_proj)


def test_gpt_oss_mxfp4_experts_are_dequantised_at_load(tmp_path):
    """The MXFP4 checkpoint gives the logits transformers gives for the same weights dequantised."""
    mxfp4_dir, reference_dir = make_mxfp4_gpt_oss(tmp_path)
    hf = load_hf(str(reference_dir))
    config = AutoConfig.from_pretrained(mxfp4_dir)
    check_supported(config, 2)
    ours = load_model(str(mxfp4_dir), config, TPGroup(), torch.float64, CPU)
    seqs = sequences(hf.config.vocab_size)
    assert_matches_hf(ours, hf, paged_logits(ours, seqs), seqs)
