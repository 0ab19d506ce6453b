#!/usr/bin/env bash
# Issue 12 on the GPU machine (run from the repo root; $OUT collects logs and JSON).
#   check: the GPU tests of the MoE kernels, soft-capping/sinks and the new families; the MoE tile tuning
#          (benchmarks/moe_kernels.py); a 4-layer probe of the qwen3-30b-a3b shape through tprun and HF.
#   bench: the qwen3-30b-a3b bench (benchmarks/throughput.py, HF in the same run on 32 requests with
#          outputs capped at 32 tokens: HF takes about a second per decode step there); the checkpoint
#          (61 GB) goes to /tmp if the disk has room, else to /dev/shm; the MoE and new-family tests run meanwhile.
set -u
MODE=${1:-check}
OUT=${OUT:-/tmp/issue12-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/env.log"
df -h /tmp /dev/shm | tee -a "$OUT/env.log"
free -g | tee -a "$OUT/env.log"
python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)" \
  | tee -a "$OUT/env.log"

if [ "$MODE" = check ]; then
  timeout 300 python3 -m pytest -q -p no:cacheprovider -rfE tests/test_moe_cuda.py tests/test_attention_cuda.py \
    tests/test_cuda_engine.py -k "moe or softcap or sinks or cuda_graph or layer_contract or sliding_window \
    or new_families or (greedy_tokens_match_hf_float32_on_gpu and cuda-graphs)" 2>&1 | tee "$OUT/tests.log" | tail -25
  timeout 150 python3 benchmarks/moe_kernels.py --configs-out "$OUT/moe_configs.json" --json "$OUT/moe_kernels.json" \
    2>&1 | tee "$OUT/moe_kernels.log" | tail -8
  export TPRUN_MOE_CONFIGS="$OUT/moe_configs.json"
  [ -f "$TPRUN_MOE_CONFIGS" ] || unset TPRUN_MOE_CONFIGS
  timeout 120 python3 - <<'EOF' 2>&1 | tee "$OUT/probe.log" | grep -v Loading | tail -6
import sys, time, torch
sys.path[:0] = ["benchmarks", "."]
from models import make_bench_model
from workload import Request, bench_requests
from hf_baseline import hf_generate, load_hf_model
from tprun import LLM, SamplingParams
d = make_bench_model("qwen3-30b-a3b", "/tmp/probe4", torch.bfloat16, "cuda", num_hidden_layers=4)
reqs = bench_requests(256, 151936)
prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in reqs]
llm = LLM(model=str(d), dtype="bfloat16", device="cuda", max_model_len=2064, seed=0)
def run(n, p=prompts):
    torch.cuda.synchronize(); t = time.perf_counter()
    llm.generate(p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)); torch.cuda.synchronize()
    return time.perf_counter() - t
run(4, prompts[:8]); t1 = run(1); t65 = run(65)
print(f"probe tprun 4 layers: prefill 256 prompts {t1:.2f} s, decode {1e3 * (t65 - t1) / 64:.2f} ms/step at batch 256")
llm.shutdown(); del llm
m = load_hf_model(str(d), torch.bfloat16, "cuda")
print("HF experts:", m.config._experts_implementation)
few = [Request(r.prompt_token_ids, 1) for r in reqs[:64]]
hf_generate(m, few[:2], 2, "cuda")
r1, _ = hf_generate(m, few, 64, "cuda")
r33, _ = hf_generate(m, [Request(r.prompt_token_ids, 33) for r in reqs[:64]], 64, "cuda")
print(f"probe HF 4 layers batch 64: prefill {r1.seconds:.2f} s, decode {1e3 * (r33.seconds - r1.seconds) / 32:.2f} ms/step")
EOF
fi

if [ "$MODE" = bench ]; then
  avail=$(df --output=avail -k /tmp | tail -1)
  if [ "$avail" -gt $((66 * 1024 * 1024)) ]; then ROOT=/tmp/bench-models; else ROOT=/dev/shm/bench-models; fi
  echo "model root $ROOT" | tee -a "$OUT/env.log"
  # The checkpoint is written (GPU init, host serialisation) while the tests run.
  (timeout 300 python3 benchmarks/models.py --shape qwen3-30b-a3b --out "$ROOT/qwen3-30b-a3b-bfloat16" \
    --device cuda > "$OUT/make_model.log" 2>&1; echo "make_model rc $? at $(date +%T)" >> "$OUT/make_model.log") &
  MAKER=$!
  timeout 150 python3 -m pytest -q -p no:cacheprovider -rfE tests/test_moe_cuda.py tests/test_cuda_engine.py \
    -k "moe_cuda or new_families" 2>&1 | tee "$OUT/tests.log" | tail -6
  wait $MAKER
  tail -1 "$OUT/make_model.log"
  [ -f "${TPRUN_MOE_CONFIGS:-/nonexistent}" ] || unset TPRUN_MOE_CONFIGS
  echo "TPRUN_MOE_CONFIGS=${TPRUN_MOE_CONFIGS:-unset (moe_cuda.CONFIGS)}" | tee -a "$OUT/env.log"
  timeout "${BENCH_TIMEOUT:-400}" python3 benchmarks/throughput.py --shape qwen3-30b-a3b --model-root "$ROOT" \
    --batch1-tokens 16 --hf-requests "${HF_REQUESTS:-32}" --hf-batch-size "${HF_REQUESTS:-32}" \
    --hf-max-tokens "${HF_MAX_TOKENS:-32}" --json "$OUT/bench.json" 2>&1 | grep -v "Loading weights" \
    | tee "$OUT/bench.log" | tail -9
fi
