#!/usr/bin/env bash
# Create .venv with the CPU build of torch and this package (idempotent; safe to run again).
# EXTRAS picks the optional dependencies (default: test); scripts/test.sh adds dev (lm-eval).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# Every package at the version the tests pass with (constraints.txt); pyproject.toml's ranges alone let a fresh .venv float.
# torch first, pinned to the CPU build that pip finds locally: an unpinned torch pulls GBs of CUDA wheels.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q -c constraints.txt "torch==2.13.0"
.venv/bin/pip install -q -c constraints.txt -e ".[${EXTRAS:-test}]"
