"""A tiny random checkpoint of any supported family, with an offline byte-level BPE tokenizer, for demos and tests.

Nothing comes from a model hub: the tokenizer is trained here on a small built-in corpus and the weights
are drawn from a seeded generator, so the same (arch, seed, overrides) always writes the same files.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

DEMO_ARCHS = (
    "llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "gemma2", "gemma3", "phi3",
)

# Odd on purpose: with TP=2 the vocabulary must be padded, which the demo exercises.
DEMO_VOCAB_SIZE = 331

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>")
BOS, EOS, PAD = SPECIAL_TOKENS[:3]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Tiny shapes: fast on two CPU cores, yet every feature is there (GQA, two layers, TP=2-divisible heads).
# initializer_range is large so that greedy logits are well separated, not near-ties.
BASE_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "initializer_range": 0.2,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}
ARCH_CONFIG: dict[str, dict[str, Any]] = {
    "llama": {"model_type": "llama", "head_dim": 16},
    "mistral": {"model_type": "mistral", "head_dim": 16, "sliding_window": None},
    "qwen2": {"model_type": "qwen2"},  # q/k/v biases
    "qwen3": {"model_type": "qwen3", "head_dim": 32},  # q/k norms; head_dim != hidden / heads
    # MoE: expert counts that TP=2 does not divide (every rank holds every expert, each split by columns).
    "mixtral": {"model_type": "mixtral", "head_dim": 16, "num_local_experts": 3, "num_experts_per_tok": 2},
    "qwen2_moe": {"model_type": "qwen2_moe", "num_experts": 5, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 64},  # shared expert with its sigmoid gate
    "qwen3_moe": {"model_type": "qwen3_moe", "head_dim": 32, "num_experts": 5, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 32, "norm_topk_prob": True, "mlp_only_layers": [0]},  # layer 0 dense
    # Sliding windows are small (8) so that test prompts run past them.
    "gpt_oss": {"model_type": "gpt_oss", "head_dim": 16, "num_local_experts": 3, "num_experts_per_tok": 2,
                "intermediate_size": 64, "sliding_window": 8,  # sinks, biases, clamped SwiGLU, YaRN
                "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                                    "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 8}},
    "gemma2": {"model_type": "gemma2", "head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 24,
               "tie_word_embeddings": True},  # soft-capping (attention 50, final 30)
    "gemma3": {"model_type": "gemma3_text", "head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 24,
               "tie_word_embeddings": True, "layer_types": ["sliding_attention", "full_attention"]},
    # Fused qkv/gate_up, half the head rotated, LongRoPE (short factors below 64 tokens, long above).
    "phi3": {"model_type": "phi3", "rope_parameters": {
        "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
        "original_max_position_embeddings": 64, "factor": 4.0,
        "short_factor": [1.0, 1.1, 1.3, 1.6], "long_factor": [1.5, 2.0, 3.0, 4.5]}},
}

CORPUS = """\
The quick brown fox jumps over the lazy dog. A tensor parallel job splits every matrix across ranks.
Each rank holds a slice of the weights, computes a partial result, and the ranks add their partial sums.
Language models read tokens, predict the next token, and repeat until they reach the end of the text.
Once upon a time there was a small model that lived on a laptop and answered questions about the weather.
It was sunny on Monday, rainy on Tuesday, and on Wednesday the wind blew the leaves across the river.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 256 1024 2048 4096. Dates: 2024-01-31, 1999-12-31.
Questions and answers: What is the capital of France? Paris. How many legs does a spider have? Eight.
def add(a, b):
    return a + b
for i in range(10):
    print(i * i)
{"id": 1, "prompt": "Hello, world!"} [1, 2, 3] (x, y) <tag>value</tag> a_b-c.d/e:f;g=h&i|j~k
Schedulers batch requests, caches keep keys and values, and samplers choose the next token greedily.
Please write a short poem about the sea. The sea is wide, the sea is deep, the waves roll in and never sleep.
"""


def train_tokenizer(vocab_size: int = DEMO_VOCAB_SIZE):
    """A byte-level BPE tokenizer trained on CORPUS, wrapped for transformers (bos prepended, chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"the demo corpus yields {tok.get_vocab_size()} tokens, not {vocab_size}")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(SPECIAL_TOKENS[3:]),
        chat_template=CHAT_TEMPLATE,
    )


def make_demo_model(
    out_dir: str | Path,
    arch: str = "llama",
    seed: int = 0,
    *,
    max_shard_size: int | str | None = None,
    **config_overrides: Any,
) -> Path:
    """Write a tiny random `arch` checkpoint (safetensors, sharded when max_shard_size is given) and its
    tokenizer to out_dir; config_overrides go into the model config (e.g. num_key_value_heads=1)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if arch not in ARCH_CONFIG:
        raise ValueError(f"unknown demo architecture {arch!r}; choose one of: {', '.join(DEMO_ARCHS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = train_tokenizer()
    settings = {**BASE_CONFIG, **ARCH_CONFIG[arch]}
    model_type = settings.pop("model_type")
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (("bos", BOS), ("eos", EOS), ("pad", PAD))}
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        **{**settings, **config_overrides},
    )

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Gemma stores its norm weights as offsets from 1.
    _randomize_norms_and_biases(model, seed, norm_center=0.0 if model_type.startswith("gemma") else 1.0)
    with _quiet_progress_bars():
        model.save_pretrained(out_dir, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out_dir)
    return out_dir


@contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def _randomize_norms_and_biases(model: torch.nn.Module, seed: int, norm_center: float = 1.0) -> None:
    """transformers initialises norms to 1 and biases to 0; make them random too, so a weight loaded into
    the wrong place (q_norm for k_norm, a bias shard off by one head) changes the logits."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 or name.endswith("_bias"):  # gpt-oss's expert biases are [E, ...]
                noise = 0.2 * torch.randn(param.shape, generator=gen, dtype=param.dtype)
                param.copy_(noise if name.endswith(("bias", "sinks")) else norm_center + noise)
