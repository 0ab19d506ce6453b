"""Random-weight checkpoints of the benchmark shapes (../shared/BENCH.md), written with save_pretrained so
the engine's real load path runs. Nothing comes from a hub: the tokenizer is a word-level one whose
vocabulary is the model's ("t0" ... "tN"), so every token id decodes.

    python benchmarks/models.py --shape llama3-8b --out /tmp/bench-llama3-8b [--device cuda]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

import torch

SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": {
        "model_type": "qwen3", "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
        "tie_word_embeddings": True, "rope_theta": 1_000_000.0, "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
    },
    "llama3-8b": {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
        "tie_word_embeddings": False, "rope_theta": 500_000.0, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
    },
    # MoE: every layer sparse, 128 experts, 8 routed per token; about 30.5B parameters (61 GB in bf16).
    "qwen3-30b-a3b": {
        "model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
        "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
        "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": False, "rope_theta": 1_000_000.0,
        "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
    },
    # CI-sized: a few seconds per request on two CPU cores, yet GQA and several layers.
    "small": {
        "model_type": "llama", "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32, "vocab_size": 8192,
        "tie_word_embeddings": False, "rope_theta": 10_000.0, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
    },
}
MARKER = "bench_shape.json"


def bench_tokenizer(vocab_size: int):
    """A byte-level tokenizer filling the model's vocabulary: ids 0-2 special, then the 256 bytes, then
    two- and three-byte tokens. Real text decodes and grammars (structured output) compile against it; the bench
    feeds token ids, so how it would split text does not matter."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(33, 127)] + [chr(c) for c in range(161, 173)] + [chr(c) for c in range(174, 256)]
    chars += [chr(c) for c in range(256, 256 + 256 - len(chars))]  # GPT-2's byte-to-unicode table
    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2}
    for c in chars:
        vocab[c] = len(vocab)
    for n in (2, 3):
        for parts in itertools.product(chars, repeat=n):
            if len(vocab) >= vocab_size:
                break
            vocab["".join(parts)] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, [], unk_token=None, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_bench_model(shape: str, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16,
                     device: str = "cpu", seed: int = 0, **overrides: Any) -> Path:
    """Write the checkpoint once; a directory already holding this (shape, dtype, seed, overrides) is
    reused. overrides change config fields (tests use fewer layers of a bench shape)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of: {', '.join(SHAPES)}")
    out_dir = Path(out_dir)
    stamp = {"shape": shape, "dtype": str(dtype), "seed": seed, **overrides}
    marker = out_dir / MARKER
    if marker.exists() and json.loads(marker.read_text()) == stamp:
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = SHAPES[shape] | overrides
    config = AutoConfig.for_model(settings.pop("model_type"), bos_token_id=0, eos_token_id=1, pad_token_id=2,
                                  **settings)
    torch.manual_seed(seed)
    with torch.device(device):  # random init on the GPU takes seconds where the CPU takes minutes
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out_dir, max_shard_size="5GB")  # each shard is serialised in host memory first
    tokenizer = bench_tokenizer(config.vocab_size)
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out_dir)
    marker.write_text(json.dumps(stamp))  # last: a crash mid-write leaves no marker
    return out_dir


def wait_for_model(path: Path, timeout_s: float = 1800.0) -> None:
    """Ranks other than 0 wait for rank 0 to finish writing the checkpoint."""
    deadline = time.monotonic() + timeout_s
    while not (path / MARKER).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no checkpoint appeared in {path} within {timeout_s:.0f} s (rank 0 writes it)")
        time.sleep(1.0)


def rank_model(args, rank: int):
    """The checkpoint of args.shape in args.dtype, written by rank 0 (the others wait for it):
    (model_dir, torch dtype, its config)."""
    from transformers import AutoConfig

    dtype = getattr(torch, args.dtype)
    model_dir = Path(args.model_root) / f"{args.shape}-{args.dtype}"
    if rank == 0:
        make_bench_model(args.shape, model_dir, dtype, args.device)
    else:
        wait_for_model(model_dir)
    return model_dir, dtype, AutoConfig.from_pretrained(model_dir, local_files_only=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = make_bench_model(args.shape, args.out, getattr(torch, args.dtype), args.device, args.seed)
    print(path)


if __name__ == "__main__":
    main()
