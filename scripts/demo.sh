#!/usr/bin/env bash
# The main job on the embedded default backbone: fetch SmolLM2-135M (once), train a LoRA adapter
# on the shipped demo task in 8-bit on CPU, evaluate it, and show predictions. Then publish it into
# a temporary registry beside copies of the reference adapters (pulled from adapters/) and answer
# one batch whose rows name different adapters (demo, sst2, date_iso, base, auto) on one backbone.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate

# Everything but runs/ goes to a temp folder: the repo's adapters/ registry is only read.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/adapterhub-demo.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
trap 'exit 130' INT  # so that Ctrl-C also runs the EXIT clean-up
trap 'exit 143' TERM
REGISTRY="$WORK/registry"

adapterhub-lite train scripts/tasks/demo.yaml --output runs/demo --overwrite
adapterhub-lite eval runs/demo --split dev
cat > runs/demo-requests.jsonl <<'JSONL'
{"text": "My parcel with the new headphones is three weeks late."}
{"text": "I paid for the annual plan but got billed monthly as well."}
{"text": "After the latest update my tablet reboots every few minutes."}
JSONL
adapterhub-lite predict runs/demo --input runs/demo-requests.jsonl

echo
echo "== a registry with the reference adapters (pulled from adapters/, same versions) and the new demo adapter"
for name in sst2 date_iso ag_news person_json; do
  adapterhub-lite info "$name" --registry adapters > "$WORK/info.json"  # its latest version, kept in the copy
  version=$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["version"])' "$WORK/info.json")
  adapterhub-lite pull "$name@$version" --registry adapters --to "$WORK/pulled/$name" > /dev/null  # verified copy
  adapterhub-lite publish "$WORK/pulled/$name" --registry "$REGISTRY" --name "$name" --version "$version" > /dev/null
done
adapterhub-lite publish runs/demo --registry "$REGISTRY" --name demo > /dev/null
adapterhub-lite list --registry "$REGISTRY"

echo
echo "== one batch (scripts/demo_batch.jsonl): each row names its adapter, 'base' (no adapter) or 'auto' (routed by content)"
adapterhub-lite infer --registry "$REGISTRY" --input scripts/demo_batch.jsonl --output "$WORK/answers.jsonl"
python scripts/demo_table.py scripts/demo_batch.jsonl "$WORK/answers.jsonl"
