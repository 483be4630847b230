#!/usr/bin/env bash
# vLLM's own code for scripts/check_vllm_export.py (tests/test_export.py, marker `harness`), in .venv-vllm/: a folder of
# packages put on PYTHONPATH beside .venv, not a venv. vLLM's wheel pins torch 2.14 with CUDA and ~80 packages a server
# needs; the check needs only its `serve` parser and LoRA loader, so scripts/vllm-check-requirements.txt installs vLLM
# and the modules those import with --no-deps, every file pinned by sha256, and .venv's torch/transformers/peft serve.
# The wheel's compiled .so files are deleted: they load only with CUDA (libcuda.so.1) and the check never imports them
# (~300 MB). 250 MB downloaded, about 1 minute on 2 cores. Idempotent: a finished folder (its stamp names the
# requirements' hash) is kept; one cut short never gets the stamp (it is built as .venv-vllm.partial and renamed when
# done), so it is built again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
REQS=scripts/vllm-check-requirements.txt
WANT=$(sha256sum "$REQS" | cut -c1-16)
STAMP=.venv-vllm/.adapterhub-vllm-check
if [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ]; then
  exit 0
fi
TAG=$("$PYTHON" -c 'import platform, sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}-{platform.system()}-{platform.machine()}")')
if [ "$TAG" != "cp311-Linux-x86_64" ]; then
  echo "setup_vllm_check.sh: $REQS pins CPython 3.11 x86_64 Linux wheels, but $PYTHON is $TAG; run it with PYTHON=<such a python> or re-pin the hashes for yours" >&2
  exit 2
fi
rm -rf .venv-vllm .venv-vllm.partial
"$PYTHON" -m pip install -q --disable-pip-version-check --no-deps --only-binary :all: --require-hashes --target .venv-vllm.partial -r "$REQS"
find .venv-vllm.partial/vllm -name '*.so' -delete
echo "$WANT" > .venv-vllm.partial/.adapterhub-vllm-check
mv .venv-vllm.partial .venv-vllm
