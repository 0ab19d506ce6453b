"""The baseline: HF transformers `generate` on the same requests, static batches, left padding, sdpa.

Each static batch runs until its longest request is done (greedy, no EOS stop), as a user of `generate`
gets it; throughput counts only the tokens each request asked for.

    python benchmarks/hf_baseline.py --model DIR [--num-requests 64] [--batch-size 64] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass

import torch
from workload import Request, bench_requests


@dataclass
class HFResult:
    seconds: float
    num_requests: int
    batch_size: int
    prompt_tokens: int
    output_tokens: int  # asked for
    generated_tokens: int  # incl. the tokens past a request's length that its static batch still computed

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def total_tok_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.seconds


def load_hf_model(model_dir: str, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM

    # Straight onto the device where transformers can: a 61 GB checkpoint would not fit twice in host memory.
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa",
                                                     device_map=device if device != "cpu" else None)
    except (ImportError, ValueError):  # a transformers that wants accelerate for device_map
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device).eval()
    model.generation_config.eos_token_id = None  # ignore_eos: every request runs to its length
    return model


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def hf_generate(model, requests: list[Request], batch_size: int, device: str,
                pad_token_id: int = 0) -> tuple[HFResult, list[list[int]]]:
    """Greedy outputs (each cut to its max_tokens) and the time of all batches."""
    outputs: list[list[int]] = []
    generated = 0
    _sync(device)
    start = time.perf_counter()
    for i in range(0, len(requests), batch_size):
        batch = requests[i:i + batch_size]
        width = max(len(r.prompt_token_ids) for r in batch)
        ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, r in enumerate(batch):  # left padding
            ids[row, width - len(r.prompt_token_ids):] = torch.tensor(r.prompt_token_ids)
            mask[row, width - len(r.prompt_token_ids):] = 1
        new = max(r.max_tokens for r in batch)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new,
                             do_sample=False, pad_token_id=pad_token_id)
        gen = out[:, width:].tolist()
        generated += len(batch) * new
        outputs += [g[: r.max_tokens] for g, r in zip(gen, batch, strict=True)]
    _sync(device)
    seconds = time.perf_counter() - start
    result = HFResult(seconds, len(requests), batch_size, sum(len(r.prompt_token_ids) for r in requests),
                      sum(r.max_tokens for r in requests), generated)
    return result, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    model = load_hf_model(args.model, getattr(torch, args.dtype), args.device)
    requests = bench_requests(args.num_requests, model.config.vocab_size)
    result, _ = hf_generate(model, requests, args.batch_size, args.device, model.config.pad_token_id or 0)
    print(json.dumps(asdict(result) | {"output_tok_s": result.output_tok_s, "total_tok_s": result.total_tok_s}))


if __name__ == "__main__":
    main()
