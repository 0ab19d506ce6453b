#!/usr/bin/env bash
# Issue 11 on the GPU machine (repo root; $OUT collects logs and JSON; pydantic/xgrammar wheels in .whl).
#   qwen:  GPU engine, sampler and attention tests, the sampler's kernel times; the qwen3-0.6b bench with scheduling ahead on and off (greedy,
#          sampled) and batch-1 decode, HF in the same run; the shared-prefix variant.
#   VARIANTS overrides the variants timed after the plain run (a name twice: timed twice).
#   llama: the same bench on the llama3-8b shape, then its shared-prefix variant.
set -u
MODE=${1:-qwen}
OUT=${OUT:-/tmp/issue11-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/env.log"
VARIANTS=${VARIANTS:-"greedy greedy-sync sampled sampled-sync"}
if [ "$MODE" = qwen ]; then
  timeout 200 python3 -m pytest -q -n 8 -p no:cacheprovider -rfE tests/test_cuda_engine.py tests/test_sampling_race.py tests/test_attention_cuda.py \
    2>&1 | tee "$OUT/tests.log" | tail -8
  timeout 60 python3 benchmarks/sampling_kernels.py 2>&1 | tail -8
  timeout 240 python3 benchmarks/throughput.py --shape qwen3-0.6b --hf-requests 8 --hf-max-tokens 128 \
    --batch1-tokens 64 --variants $VARIANTS --json "$OUT/qwen.json" 2>&1 | grep -v Loading | tee "$OUT/qwen.log" | tail -14
  timeout 120 python3 benchmarks/shared_prefix.py --shape qwen3-0.6b --json "$OUT/qwen_prefix.json" 2>&1 \
    | grep -v Loading | tail -6
else
  timeout 330 python3 benchmarks/throughput.py --shape llama3-8b --hf-requests 8 --hf-max-tokens 128 \
    --batch1-tokens 64 --variants $VARIANTS --json "$OUT/llama.json" 2>&1 | grep -v Loading | tee "$OUT/llama.log" | tail -14
  timeout 200 python3 benchmarks/shared_prefix.py --shape llama3-8b --json "$OUT/llama_prefix.json" 2>&1 \
    | grep -v Loading | tail -6
fi
