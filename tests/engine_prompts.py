"""Deterministic test prompts (token ids) of different lengths, valid for any vocabulary."""

from __future__ import annotations

import random

PROMPT_LENGTHS = [3, 17, 5, 29, 11, 1, 23, 8, 40]


def make_prompts(vocab_size: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    # Skip the low ids: the demo tokenizer keeps its special tokens there.
    return [[rng.randrange(8, vocab_size) for _ in range(n)] for n in lengths]
