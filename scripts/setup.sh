#!/usr/bin/env bash
# One-time set-up of a fresh machine: a venv in .venv with tprun and its test tools.
# torch goes first and pinned: the CPU wheel lies on local disk; any other order pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[test,launch]'
