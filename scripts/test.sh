#!/usr/bin/env bash
# Set up .venv if needed, then run the test suite (tiny random backbone; no network, no GPU).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` for the real-backbone test.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${EXTRAS:-test,dev} bash scripts/setup.sh  # dev: lm-eval, which the server is tested with
.venv/bin/python -m pytest -q "$@"
