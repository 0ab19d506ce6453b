#!/usr/bin/env bash
# Sets everything up, then runs the main job: a 2-rank torchrun job (TP=2, gloo on CPU) on the
# embedded demo model over examples/prompts.jsonl, and prints the results.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
[ -f demo-model/config.json ] || tprun demo-model demo-model
# --standalone: torchrun picks a free port itself (no fixed port to collide with).
torchrun --standalone --nproc-per-node 2 -m tprun run \
  --model demo-model --input examples/prompts.jsonl --output out/demo --tp 2 \
  --max-tokens 24 --temperature 0 --overwrite
echo "--- out/demo/results.jsonl"
cat out/demo/results.jsonl
