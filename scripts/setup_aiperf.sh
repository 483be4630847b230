#!/usr/bin/env bash
# NVIDIA aiperf, the load tester tests/test_aiperf.py points at the server, in its own .venv-aiperf: it needs
# transformers 5, which the package's pins exclude, so it cannot share .venv. Idempotent: a finished venv (its
# stamp names the pinned version and constraints) is kept; a half-built one (no stamp: an install cut short) or
# one built under other constraints is built again. scripts/aiperf-constraints.txt pins every dependency too.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.13.0
CONSTRAINTS=scripts/aiperf-constraints.txt
WANT="$VERSION $(sha256sum "$CONSTRAINTS" | cut -c1-16)"
STAMP=.venv-aiperf/.adapterhub-aiperf
if [ -x .venv-aiperf/bin/aiperf ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ]; then
  exit 0
fi
rm -rf .venv-aiperf
"${PYTHON:-python3}" -m venv .venv-aiperf
.venv-aiperf/bin/pip install -q --disable-pip-version-check -c "$CONSTRAINTS" "aiperf==$VERSION"
echo "$WANT" > "$STAMP"
