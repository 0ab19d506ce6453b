#!/usr/bin/env bash
# Sets everything up, starts a real 2-node Slurm on this host (root; skipped otherwise), runs the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
slurm_up=0
if [ "$(id -u)" = 0 ] && [ -z "${TPRUN_NO_SLURM:-}" ]; then
  if bash scripts/slurm-up.sh; then
    slurm_up=1
  elif [ -n "${TPRUN_REQUIRE_SLURM:-}" ]; then
    echo "test.sh: the Slurm cluster did not start and TPRUN_REQUIRE_SLURM is set" >&2
    exit 1
  else
    echo "test.sh: the Slurm cluster did not start; its tests will skip" >&2
  fi
fi
trap '[ $slurm_up = 1 ] && bash scripts/slurm-down.sh || true' EXIT
status=0
python -m pytest -q -ra "$@" || status=$?
ruff check tprun tests benchmarks || status=$((status ? status : 1))
exit $status
