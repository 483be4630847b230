#!/usr/bin/env bash
# NVIDIA aiperf, the load tester tests/test_aiperf.py points at the server, in its own .venv-aiperf: it needs
# transformers 5, which the package's pins exclude, so it cannot share .venv. Idempotent: a finished venv (its
# stamp names the pinned version) is kept; a half-built one (no stamp: an install cut short) is built again.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.13.0
STAMP=.venv-aiperf/.adapterhub-aiperf
if [ -x .venv-aiperf/bin/aiperf ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$VERSION" ]; then
  exit 0
fi
rm -rf .venv-aiperf
"${PYTHON:-python3}" -m venv .venv-aiperf
.venv-aiperf/bin/pip install -q --disable-pip-version-check "aiperf==$VERSION"
echo "$VERSION" > "$STAMP"
