"""The bench workload of ../shared/BENCH.md: random prompts and output lengths, the same on every run."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch


@dataclass
class Request:
    prompt_token_ids: list[int]
    max_tokens: int  # generated exactly (ignore_eos)


def bench_requests(num_requests: int = 256, vocab_size: int = 32000, input_len: tuple[int, int] = (100, 1024),
                   output_len: tuple[int, int] = (100, 1024), seed: int = 0) -> list[Request]:
    """Lengths uniform in the closed ranges from random.Random(seed); token ids from a seeded torch.Generator."""
    rng = random.Random(seed)
    lens = [(rng.randint(*input_len), rng.randint(*output_len)) for _ in range(num_requests)]
    gen = torch.Generator().manual_seed(seed)
    return [Request(torch.randint(0, vocab_size, (p,), generator=gen).tolist(), o) for p, o in lens]
