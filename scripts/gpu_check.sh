#!/usr/bin/env bash
# GPU check (issue 9): on a CUDA machine, from the project root, after `. .gpu/on_device.sh`
# (../shared/gpu/README.md), within 590 s (one device command; the limits of each phase are below):
#   router  bench_router.py, GPU geometry: SmolLM2-135M (real weights) in 8-bit, then in bf16 at 64 rows (static decode, CUDA graphs)
#   train   bench_train.py on the sst2 spec: bf16 × {8bit, none} on the 135M (with the plain-peft loop and HF Trainer
#           beside ours) and on the 1.7B shape (ours only)
#   sst2    a 5-minute sst2 training in 8-bit (train.max_minutes=5); its final dev accuracy from the sidecar
#   tests   the test suite with ADAPTERHUB_TEST_DEVICE=cuda (runs beside sst2: neither is a timing benchmark)
#
#   bash scripts/gpu_check.sh [OUTDIR] [PHASE ...]      # OUTDIR: $OUT if set, else runs/gpu_check; phases: all
#
# OUTDIR gets router.jsonl, train.jsonl, sst2.jsonl, tests.jsonl (each a JSON line per run), summary.jsonl (one
# line per phase) and logs.txt (each run's log tail); full logs and the models stay in $GPU_CHECK_WORK. Every phase
# has its own timeout and a failure does not stop the others. Without the real weights ($ADAPTERHUB_CACHE/
# smollm2-135m, rebuilt by on_device.sh once every model part has arrived) the 135M runs use a random-weight
# model of the same shape and sst2 is skipped; without a SmolLM2 tokenizer (the real folder, or a copy of its
# config + tokenizer in .gpu/like, or .gpu/smolcfg.tgz / .gpu/like.tgz holding smolcfg/ or like/) train is
# skipped too, because text would tokenize differently. sst2 data: ../shared/data, shared/data, .gpu/data, or
# .gpu/data.tgz (1.5 MB) holding data/sst2/{train,dev}.tsv, made here with
#   mkdir -p /tmp/d/data && cp -r ../shared/data/sst2 /tmp/d/data && tar czf .gpu/data.tgz -C /tmp/d data
#
# GPU_CHECK_QUICK=1 rehearses every command line on a CPU in a few minutes: tiny geometry and steps, a tiny
# stand-in for the 1.7B shape, one test file (GPU_CHECK_TESTS), a 64-row dev set.
# Knobs: GPU_CHECK_ROUTER_GEO (extra bench_router arguments), GPU_CHECK_BUDGET (s, whole run), GPU_CHECK_T_{ROUTER,TRAIN,SST2,TESTS} (s per phase), GPU_CHECK_TESTS,
# GPU_CHECK_SST2_MINUTES, GPU_CHECK_SST2_STEPS, GPU_CHECK_WORK, PY.
set -uo pipefail
cd "$(dirname "$0")/.."

ALL_PHASES=(router train sst2 tests)
OUTDIR=${OUT:-runs/gpu_check}
if [ $# -gt 0 ] && [[ ! " ${ALL_PHASES[*]} " =~ " $1 " ]]; then OUTDIR=$1; shift; fi
PHASES=("$@"); [ ${#PHASES[@]} -eq 0 ] && PHASES=("${ALL_PHASES[@]}")
for p in "${PHASES[@]}"; do
  [[ " ${ALL_PHASES[*]} " =~ " $p " ]] || { echo "gpu_check: unknown phase '$p' (phases: ${ALL_PHASES[*]})" >&2; exit 2; }
done
want() { [[ " ${PHASES[*]} " =~ " $1 " ]]; }

if [ -z "${PY:-}" ]; then [ -x .venv/bin/python ] && PY=.venv/bin/python || PY=python3; fi
QUICK=${GPU_CHECK_QUICK:-0}
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check}
mkdir -p "$OUTDIR" "$WORK/models"
# A run of some phases replaces those phases' lines only; summary.jsonl and logs.txt are appended to.
for p in "${PHASES[@]}"; do rm -f "$OUTDIR/$p.jsonl"; done
[ ${#PHASES[@]} -eq ${#ALL_PHASES[@]} ] && rm -f "$OUTDIR/summary.jsonl" "$OUTDIR/logs.txt"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_PROGRESS_BARS=1
START=$(date +%s)

# One interpreter start (torch takes seconds to import): CUDA?, the backbone cache, the device's name, torch's version.
mapfile -t ENV < <($PY -c "import torch; from adapterhub_lite.model.weights import cache_dir; c = torch.cuda.is_available()
print(int(c)); print(cache_dir()); print(torch.cuda.get_device_name() if c else 'cpu'); print(torch.__version__)" 2>/dev/null)
CUDA=${ENV[0]:-0}; CACHE=${ENV[1]:-$HOME/.cache/adapterhub_lite}
if [ "$CUDA" != 1 ] && [ "$QUICK" != 1 ]; then
  echo "gpu_check: no CUDA device visible to $PY (for a CPU rehearsal set GPU_CHECK_QUICK=1)" >&2; exit 2
fi
DEVICE=$([ "$CUDA" = 1 ] && echo cuda || echo cpu)
export ADAPTERHUB_DEVICE=$DEVICE

if [ "$QUICK" = 1 ]; then
  BUDGET=${GPU_CHECK_BUDGET:-3000}; T_ROUTER=${GPU_CHECK_T_ROUTER:-900}; T_TRAIN=${GPU_CHECK_T_TRAIN:-900}
  T_SST2=${GPU_CHECK_T_SST2:-600}; T_TESTS=${GPU_CHECK_T_TESTS:-600}; TESTS=${GPU_CHECK_TESTS:-tests/test_backbone.py}
  BIG_SHAPE=tiny; SST2_MIN=${GPU_CHECK_SST2_MINUTES:-0.1}; SST2_STEPS=${GPU_CHECK_SST2_STEPS:-3}
  SST2_EXTRA=(train.warmup_steps=0)  # sst2.yaml warms up 30 steps: train refuses a warm-up as long as the run
  ROUTER_GEO=(--geometry gpu --rows 4 --tokens 32 --prompt-tokens 16 --new-tokens 4 --repeats 1 --warmup 1); ROUTER_BF16=()
  TRAIN_ARGS=(--steps 4 --warmup-steps 1 --dev-rows 8); TRAIN_DTYPES=(fp32); SCALE=10  # a CPU is slower
else
  # Router and train run alone (they time things). The device lends 10 minutes a command (15 a session), so the whole
  # check fits 590 s: router 100, train 150 (ours, plain peft and HF Trainer on the 135M; ours on the 1.7B shape), then
  # sst2 (5 minutes of real-weight training, load and final eval) beside the CUDA test suite, 340 each. Measured on
  # an H200 (2026-11-26, before these limits): tests 161 s, one 135M router run 120 s at rows 64 / 8 new tokens, one
  # 135M train run 89 s; the router geometry below is the smaller one of the earlier figures so both runs fit.
  BUDGET=${GPU_CHECK_BUDGET:-590}
  T_SST2=${GPU_CHECK_T_SST2:-340}; T_TESTS=${GPU_CHECK_T_TESTS:-340}; TESTS=${GPU_CHECK_TESTS:-tests --ignore=tests/test_lm_eval.py}  # lm-eval is not among the staged wheels
  T_ROUTER=${GPU_CHECK_T_ROUTER:-100}; T_TRAIN=${GPU_CHECK_T_TRAIN:-150}
  BIG_SHAPE=smollm2-1.7b; SST2_MIN=${GPU_CHECK_SST2_MINUTES:-5}; SST2_STEPS=${GPU_CHECK_SST2_STEPS:-5000}; SST2_EXTRA=()
  ROUTER_GEO=(--geometry gpu --repeats 1 --warmup 1 ${GPU_CHECK_ROUTER_GEO:---rows 32 --tokens 64 --prompt-tokens 16 --new-tokens 8})
  ROUTER_BF16=(--rows 64)  # the decode goal's rows
  TRAIN_ARGS=(--steps 20 --warmup-steps 5 --dev-rows 32 --combo-timeout 40); TRAIN_DTYPES=(bf16); SCALE=1
fi
DEADLINE=$((START + BUDGET))

# ---- helpers ------------------------------------------------------------------------------------
# JSON line from key=value pairs (values parsed as JSON where they parse, else kept as strings).
jline() { $PY -c 'import json,sys
def v(s):
    try: return json.loads(s)
    except ValueError: return s
print(json.dumps({k: v(x) for k, x in (a.split("=", 1) for a in sys.argv[1:])}))' "$@"; }
# Add key=value pairs in front of a JSON object line.
jmerge() { local line=$1; shift; $PY -c 'import json,sys
d = json.loads(sys.argv[1]); extra = json.loads(sys.argv[2]); print(json.dumps({**extra, **d}))' "$line" "$(jline "$@")"; }
left() { echo $((DEADLINE - $(date +%s))); }
# Seconds a run may take: its own limit, cut to what is left of the phase and of the whole budget.
limit() { local t=$1 pend=$2 l; l=$(left); [ $((pend - $(date +%s))) -lt "$l" ] && l=$((pend - $(date +%s))); [ "$t" -lt "$l" ] && l=$t; echo "$l"; }
# The last lines of a run's log into OUTDIR/logs.txt, progress bars left out.
logtail() { { echo "=== $1 (rc $2) ==="; tr '\r' '\n' < "$WORK/$1.log" | grep -v -E 'it/s\]|s/it\]|^\s*$' | tail -n "${3:-25}"; } >> "$OUTDIR/logs.txt"; }
phase_done() { jline phase="$1" status="$2" seconds="$3" note="${4:-}" >> "$OUTDIR/summary.jsonl"; echo "gpu_check: $1 $2${4:+ ($4)} in ${3}s" >&2; }

# run NAME PHASE_END TIMEOUT OUTFILE KEY=VALUE... -- COMMAND...: the command's last stdout JSON line, tagged with
# the key=value pairs, goes to OUTFILE; on failure or timeout an error line does. Returns the command's status.
run() {
  local name=$1 pend=$2 t=$3 outfile=$4; shift 4; local tags=(); while [ "$1" != "--" ]; do tags+=("$1"); shift; done; shift
  local l; l=$(limit $((t * SCALE)) "$pend")
  if [ "$l" -lt 15 ]; then jline "${tags[@]}" error="skipped: ${l}s left of the budget" >> "$outfile"; return 124; fi
  local t0=$SECONDS rc
  timeout -k 10 "$l" "$@" > "$WORK/$name.out" 2> "$WORK/$name.log"; rc=$?
  local line; line=$(grep '^{' "$WORK/$name.out" | tail -n 1)
  if [ $rc -eq 0 ] && [ -n "$line" ]; then
    jmerge "$line" "${tags[@]}" wall_s=$((SECONDS - t0)) >> "$outfile"
  else
    local why="exit $rc: $(grep -v '^\s*$' "$WORK/$name.log" | tail -n 1 | cut -c1-300)"
    { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && why="timed out after ${l}s"
    jline "${tags[@]}" error="$why" wall_s=$((SECONDS - t0)) >> "$outfile"; [ $rc -eq 0 ] && rc=1
  fi
  cat "$WORK/$name.out" >> "$WORK/$name.log"; logtail "$name" $rc; return $rc
}

# ---- models -------------------------------------------------------------------------------------
# Staged archives (git-ignored .gpu/, small to carry): SmolLM2's config + tokenizer, and the sst2 data.
for a in .gpu/smolcfg.tgz .gpu/like.tgz .gpu/data.tgz; do [ -f "$a" ] && tar xzf "$a" -C "$WORK"; done
REAL=""; [ -f "$CACHE/smollm2-135m/config.json" ] && REAL="$CACHE/smollm2-135m"
LIKE=builtin
for d in "$REAL" .gpu/like "$WORK/smolcfg" "$WORK/like"; do [ -n "$d" ] && [ -f "$d/config.json" ] && { LIKE=$d; break; }; done
NOTE_REAL=$([ -n "$REAL" ] || echo "real weights missing ($CACHE/smollm2-135m): bring every .gpu/model part")
# make NAME SHAPE: a random-weight model (bf16 on disk), built once into $WORK/models and reused.
make_model() {
  local dir="$WORK/models/$1"
  [ -f "$dir/config.json" ] && { echo "$dir"; return 0; }
  timeout -k 10 "$(limit $((90 * SCALE)) $DEADLINE)" $PY scripts/make_random_model.py --like "$LIKE" --shape "$2" --dtype bf16 --output "$dir" \
    > "$WORK/make_$1.out" 2> "$WORK/make_$1.log" || { logtail "make_$1" $?; return 1; }
  jmerge "$(tail -n 1 "$WORK/make_$1.out")" phase=model >> "$OUTDIR/summary.jsonl"; echo "$dir"
}
M135=$REAL; M135_NAME=smollm2-135m
BIG_NAME=$([ "$BIG_SHAPE" = tiny ] && echo tiny-random || echo smollm2-1.7b-random)

DATA=""
for d in ../shared/data shared/data .gpu/data "$WORK/data"; do [ -f "$d/sst2/train.tsv" ] && { DATA=$d; break; }; done
DATA_ARGS=()
if [ -n "$DATA" ]; then
  DEV=$DATA/sst2/dev.tsv
  [ "$QUICK" = 1 ] && { head -n 65 "$DEV" > "$WORK/sst2_dev64.tsv"; DEV=$WORK/sst2_dev64.tsv; }
  DATA_ARGS=("data.train=$DATA/sst2/train.tsv" "data.dev=$DEV")
fi

jline phase=env device="${ENV[2]:-?}" torch="${ENV[3]:-?}" quick="$QUICK" real_weights="${REAL:-missing}" like="$LIKE" \
  data="${DATA:-missing}" commit="$(git rev-parse --short HEAD 2>/dev/null || echo none)" >> "$OUTDIR/summary.jsonl"

# ---- router -------------------------------------------------------------------------------------
if want router; then
  t0=$SECONDS; pend=$(( $(date +%s) + T_ROUTER )); fails=0; note=$NOTE_REAL
  if [ -z "$M135" ]; then M135=$(make_model smollm2-135m-random same) && M135_NAME=smollm2-135m-random || M135=""; fi
  if [ -n "$M135" ]; then
    run router_135m_8bit $pend 160 "$OUTDIR/router.jsonl" run=135m-8bit model=$M135_NAME -- \
      $PY scripts/bench_router.py --base "$M135" --quantization 8bit --device $DEVICE "${ROUTER_GEO[@]}" --profile "$OUTDIR/profile_135m.txt" || fails=$((fails + 1))
  else fails=$((fails + 1)); fi
  # The serving goals (issue 21) are on the 135M in bf16: the static decode cache with CUDA graphs, 64 rows. The 8-bit
  # run above decodes eager (--cuda-graphs auto leaves 8-bit out); its ratios are the 8-bit figures beside them.
  if [ -n "$M135" ]; then
    run router_135m_bf16 $pend 160 "$OUTDIR/router.jsonl" run=135m-bf16-none model=$M135_NAME -- \
      $PY scripts/bench_router.py --base "$M135" --quantization none --dtype bf16 --device $DEVICE "${ROUTER_GEO[@]}" "${ROUTER_BF16[@]}" || fails=$((fails + 1))
  else fails=$((fails + 1)); fi
  phase_done router "$([ $fails -eq 0 ] && echo ok || echo "failed ($fails)")" $((SECONDS - t0)) "$note"
fi

# ---- train --------------------------------------------------------------------------------------
if want train; then
  t0=$SECONDS; pend=$(( $(date +%s) + T_TRAIN )); fails=0
  if [ -z "$DATA" ]; then phase_done train skipped 0 "no sst2 data in ../shared/data, shared/data, .gpu/data or .gpu/data.tgz"
  elif [ "$LIKE" = builtin ]; then phase_done train skipped 0 "no SmolLM2 tokenizer here (real weights or .gpu/like)"
  else
    if [ -z "$M135" ]; then M135=$(make_model smollm2-135m-random same) && M135_NAME=smollm2-135m-random || M135=""; fi
    # ours (bf16 × 8bit and none) and, on the first combination, the plain-peft loop, the same rows and HF Trainer
    run train_135m $pend 120 "$OUTDIR/train.jsonl" run=135m model=$M135_NAME -- $PY scripts/bench_train.py scripts/tasks/sst2.yaml \
      "${DATA_ARGS[@]}" --base "$M135" --device $DEVICE --dtypes "${TRAIN_DTYPES[@]}" --quantizations 8bit none "${TRAIN_ARGS[@]}" || fails=$((fails + 1))
    if BIG=$(make_model $BIG_NAME $BIG_SHAPE); then
      run train_big $pend 130 "$OUTDIR/train.jsonl" run=big model=$BIG_NAME -- $PY scripts/bench_train.py scripts/tasks/sst2.yaml \
        "${DATA_ARGS[@]}" --base "$BIG" --device $DEVICE --dtypes "${TRAIN_DTYPES[@]}" --quantizations 8bit none "${TRAIN_ARGS[@]}" --baselines none || fails=$((fails + 1))
    else fails=$((fails + 1)); fi
    # bench_train records a failed combination inside its line rather than failing
    grep -q '_error"' "$OUTDIR/train.jsonl" 2>/dev/null && fails=$((fails + 1))
    phase_done train "$([ $fails -eq 0 ] && echo ok || echo "failed ($fails)")" $((SECONDS - t0)) "$NOTE_REAL"
  fi
fi

# ---- sst2 and tests, side by side ---------------------------------------------------------------
tests_phase() {
  local t0=$SECONDS l rc; l=$(limit "$T_TESTS" $DEADLINE)
  # -v: a run cut off by its timeout still says which tests passed and failed so far
  ADAPTERHUB_TEST_DEVICE=$DEVICE timeout -k 10 "$l" $PY -m pytest -v -rfE -p no:cacheprovider $TESTS > "$WORK/tests.log" 2>&1; rc=$?
  local summary; summary=$(grep -E '^=+ .*(passed|failed|error).* in [0-9.]+s' "$WORK/tests.log" | tail -n 1 | tr -d '=' | sed 's/^ *//; s/ *$//')
  $PY - "$WORK/tests.log" "$rc" "$summary" "$l" "$DEVICE" "$TESTS" >> "$OUTDIR/tests.jsonl" <<'PY'
import json, re, sys
log, rc, summary, limit, device, tests = sys.argv[1:]
text = open(log, errors="replace").read()
counts = {k: len(re.findall(rf"::\S+ {k.upper()}", text)) for k in ("passed", "failed", "error", "skipped")}
failed = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)))
print(json.dumps({"run": "tests", "device": device, "tests": tests, "rc": int(rc),
                  "summary": summary or f"cut off after {limit}s", **counts, "failed_tests": failed}))
PY
  logtail tests $rc 15
  phase_done tests "$([ $rc -eq 0 ] && echo ok || ([ $rc -eq 124 ] && echo timeout) || echo failed)" $((SECONDS - t0)) "$summary"
}
sst2_phase() {
  local t0=$SECONDS rc
  if [ -z "$REAL" ]; then phase_done sst2 skipped 0 "$NOTE_REAL"; return; fi
  if [ -z "$DATA" ]; then phase_done sst2 skipped 0 "no sst2 data in ../shared/data, shared/data, .gpu/data or .gpu/data.tgz"; return; fi
  local run_dir="$WORK/sst2_run" l; l=$(limit "$T_SST2" $DEADLINE)
  timeout -k 10 "$l" $PY scripts/train_adapter.py scripts/tasks/sst2.yaml "${DATA_ARGS[@]}" quantization=8bit \
    "train.max_minutes=$SST2_MIN" "train.max_steps=$SST2_STEPS" "${SST2_EXTRA[@]}" --output "$run_dir" --overwrite --no-progress > "$WORK/sst2.log" 2>&1; rc=$?
  logtail sst2 $rc 8
  if [ -f "$run_dir/adapterhub.json" ] && [ $rc -eq 0 ]; then
    $PY - "$run_dir/adapterhub.json" "$SST2_MIN" >> "$OUTDIR/sst2.jsonl" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
e, s = m.get("efficiency", {}), m.get("train_state", {})
print(json.dumps({"run": "sst2", "max_minutes": float(sys.argv[2]), "dev_accuracy": m["metrics"].get("accuracy"),
                  "dev_macro_f1": m["metrics"].get("macro_f1"), "dev_rows": m["data"]["dev"]["rows"], **s,
                  "train_tokens_per_s": e.get("train_tokens_per_s"), "peak_memory_mb": e.get("peak_memory_mb"),
                  "device": e.get("device"), "dtype": m["base"].get("dtype") or m["task"].get("dtype"), "quantization": m["task"]["quantization"]}))
PY
    local acc; acc=$(tail -n 1 "$OUTDIR/sst2.jsonl" | $PY -c 'import json,sys; print(json.load(sys.stdin)["dev_accuracy"])')
    phase_done sst2 ok $((SECONDS - t0)) "dev accuracy $acc"
  else
    local why="exit $rc: $(tail -n 1 "$WORK/sst2.log" | cut -c1-300)"; [ $rc -eq 124 ] && why="timed out after ${l}s"
    jline run=sst2 error="$why" >> "$OUTDIR/sst2.jsonl"
    phase_done sst2 "$([ $rc -eq 124 ] && echo timeout || echo failed)" $((SECONDS - t0))
  fi
}
if want sst2 && want tests; then
  tests_phase & tpid=$!
  sst2_phase
  wait $tpid
else
  want sst2 && sst2_phase
  want tests && tests_phase
fi

# ---- summary ------------------------------------------------------------------------------------
echo "== gpu_check: $(( $(date +%s) - START ))s on ${DEVICE}, results in $OUTDIR =="
$PY - "$OUTDIR" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def lines(name):
    f = out / name
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.is_file() else []
for d in lines("summary.jsonl"):
    if d.get("phase") not in ("env", "model"):
        print(f"{d['phase']:7s} {d['status']:12s} {d['seconds']:>4}s  {d.get('note') or ''}")
for d in lines("router.jsonl"):
    if "error" in d:
        print(f"router  {d['run']}: {d['error']}"); continue
    print(f"router  {d['run']} ({d['device']}, {d['dtype']}, {d['rows']}x{d['tokens']}): fwd vs base "
          + " / ".join(str(d[f"mixed{n}_vs_base"]) for n in (1, 8, 32)) + ", vs peft "
          + " / ".join(str(d[f"mixed{n}_vs_peft"]) for n in (1, 8, 32)) + "; gen vs base "
          + " / ".join(str(d[f"gen_mixed{n}_vs_base"]) for n in (1, 8, 32)) + f"; base gen {d['gen_base_tokens_per_s']} tok/s")
for d in lines("train.jsonl"):
    if "error" in d and "first" not in d:
        print(f"train   {d['run']}: {d['error']}"); continue
    combos = [k[:-len("_steady_tokens_per_s")] for k in d if k.endswith("_steady_tokens_per_s") and not k.startswith("ours_over_")]
    errs = [f"{k[:-6]} error" for k in d if k.endswith("_error")]
    print(f"train   {d['run']}: " + ", ".join(f"{c} {d[c + '_steady_tokens_per_s']} tok/s {d[c + '_steady_ms_per_step']} ms/step {d[c + '_peak_memory_mb']} MB"
                                     for c in combos) + (f"; {', '.join(errs)}" if errs else ""))
    ratios = {k: d[k] for k in d if k.startswith("ours_over_")}
    if ratios:
        print(f"train   {d['run']} ours vs plain peft: " + ", ".join(f"{k[len('ours_over_'):]} {v}" for k, v in ratios.items()))
for d in lines("sst2.jsonl"):
    print("sst2    " + (d.get("error") or f"dev accuracy {d['dev_accuracy']} ({d['dev_rows']} rows) after {d.get('steps')} steps, "
                          f"{d.get('train_seconds')} s, {d.get('train_tokens_per_s')} tok/s, {d.get('dtype')}"))
for d in lines("tests.jsonl"):
    print(f"tests   {d['summary']}" + (f"; failed: {' '.join(d['failed_tests'][:10])}" if d["failed_tests"] else ""))
PY
