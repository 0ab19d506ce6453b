"""Deterministic test prompts (token ids) of different lengths, valid for any vocabulary."""

from __future__ import annotations

import random

PROMPT_LENGTHS = [3, 17, 5, 29, 11, 1, 23, 8, 40]


def make_prompts(vocab_size: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    # Skip the low ids: the demo tokenizer keeps its special tokens there.
    return [[rng.randrange(8, vocab_size) for _ in range(n)] for n in lengths]


def make_shared_prefix_prompts(vocab_size: int, seed: int = 1) -> list[list[int]]:
    """Prompts that share prefixes of different lengths (whole blocks of 4 and not), one of them twice
    and one that is exactly the shared prefix: what prefix caching must get right."""
    rng = random.Random(seed)
    prefix = [rng.randrange(8, vocab_size) for _ in range(30)]
    prompts = [prefix[:k] + [rng.randrange(8, vocab_size) for _ in range(m)]
               for k, m in ((30, 6), (9, 3), (16, 10), (30, 1), (4, 7), (23, 2))]
    return [prompts[0], *prompts[1:], prefix, prompts[0]]
