#!/usr/bin/env bash
# The main job on the embedded default backbone: fetch SmolLM2-135M (once), train a LoRA adapter
# on the shipped demo task in 8-bit on CPU, evaluate it, and show predictions.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
adapterhub-lite train scripts/tasks/demo.yaml --output runs/demo --overwrite
adapterhub-lite eval runs/demo --split dev
cat > runs/demo-requests.jsonl <<'JSONL'
{"text": "My parcel with the new headphones is three weeks late."}
{"text": "I paid for the annual plan but got billed monthly as well."}
{"text": "After the latest update my tablet reboots every few minutes."}
JSONL
adapterhub-lite predict runs/demo --input runs/demo-requests.jsonl
