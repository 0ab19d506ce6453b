"""HF `generate`'s prefill time and decode step time on a bench shape, for a shape too slow under HF to run the
whole workload (qwen3-30b-a3b: about 0.2 s a step): each static batch of the bench's first requests is run
with outputs capped at 1 and at 1 + STEPS tokens; the difference gives the decode step, from which the
full-length run of those requests is projected (prefill + (longest output - 1) steps, as static batching
runs it). The model is built from its config straight on the GPU (random weights; the speed does not depend
on where they came from), so no 61 GB checkpoint has to be written.

    python benchmarks/hf_decode_rate.py --shape qwen3-30b-a3b --batch-sizes 32 64 [--steps 32]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_baseline import hf_generate  # noqa: E402
from models import SHAPES  # noqa: E402
from workload import Request, bench_requests  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(SHAPES))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64])
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--device", default="cuda")
    p.add_argument("--json")
    args = p.parse_args()
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(SHAPES[args.shape])
    config = AutoConfig.for_model(settings.pop("model_type"), bos_token_id=0, eos_token_id=1, pad_token_id=2,
                                  **settings)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = None
    experts = getattr(model.config, "_experts_implementation", None)
    requests = bench_requests(256, config.vocab_size)
    hf_generate(model, [Request(r.prompt_token_ids, 2) for r in requests[:2]], 2, args.device, 2)  # warm-up
    rows = []
    for b in args.batch_sizes:
        batch = requests[:b]
        one, _ = hf_generate(model, [Request(r.prompt_token_ids, 1) for r in batch], b, args.device, 2)
        more, _ = hf_generate(model, [Request(r.prompt_token_ids, 1 + args.steps) for r in batch], b, args.device, 2)
        step = (more.seconds - one.seconds) / args.steps
        longest = max(r.max_tokens for r in batch)
        projected = one.seconds + (longest - 1) * step
        out_tokens = sum(r.max_tokens for r in batch)
        rows.append({"batch": b, "prefill_s": one.seconds, "decode_step_ms": 1e3 * step,
                     "decode_tok_s": b / step, "projected_full_s": projected, "projected_out_tok_s": out_tokens / projected,
                     "capped_run_s": more.seconds, "capped_out_tok_s": b * (1 + args.steps) / more.seconds})
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": args.shape, "experts_implementation": experts,
                                               "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "rows": rows}, indent=1))
    print(f"\nHF generate, {args.shape} (experts: {experts}), first requests of the bench workload:")
    print("batch  prefill_s  step_ms  decode_tok/s  projected_full_s  projected_out_tok/s  capped(1+steps)_tok/s")
    for r in rows:
        print(f"{r['batch']:5}  {r['prefill_s']:9.2f}  {r['decode_step_ms']:7.1f}  {r['decode_tok_s']:12.0f}  "
              f"{r['projected_full_s']:16.1f}  {r['projected_out_tok_s']:19.0f}  {r['capped_out_tok_s']:21.0f}")


if __name__ == "__main__":
    main()
