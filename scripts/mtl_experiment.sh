#!/usr/bin/env bash
# The multi-task measurements of the README, on the default backbone (8-bit, CPU):
#   1. separate training of sst2, rte, ag_news: 80 steps x 16 rows each (3,840 rows in all);
#   2. joint training of the three (dynamic weighting, temperature sampling, shared adapter) on the
#      same 3,840 rows: 240 steps x 16 mixed rows;
#   3. the interference matrix over both, plus equal-weight linear and TIES merges;
#   4. learned composition for rte (held out) from the four reference adapters, from 16 shots.
# Each step takes tens of minutes on 2 cores; runs/ receives everything.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/adapterhub-lite ] || bash scripts/setup.sh
source .venv/bin/activate
ROWS="train.max_steps=80 train.eval_every=40 train.eval_samples=200 train.warmup_steps=10 train.checkpoint_every=40 train.max_minutes=0"
for t in sst2 rte ag_news; do
  adapterhub-lite train scripts/tasks/$t.yaml --output runs/sep/$t --no-progress $ROWS
done
adapterhub-lite train-multi scripts/tasks/sst2.yaml scripts/tasks/rte.yaml scripts/tasks/ag_news.yaml \
  --weighting dynamic --sampling temperature --temperature 2 --shared-adapter \
  train.max_steps=240 train.batch_size=16 train.warmup_steps=10 train.eval_every=80 train.checkpoint_every=80 train.eval_samples=200 train.max_minutes=0 \
  --output runs/mtl
adapterhub-lite interference runs/sep/sst2 runs/sep/rte runs/sep/ag_news runs/mtl --output runs/report --rows 200
adapterhub-lite compose-fit scripts/tasks/rte.yaml --from sst2 ag_news date_iso person_json \
  --shots 16 --search cma --budget 40 --lora-steps 40 --output runs/compose_rte
