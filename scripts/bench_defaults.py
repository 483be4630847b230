"""Do the defaults hold up? Train each task from its minimal spec and compare with its tuned reference.

    python scripts/bench_defaults.py --tasks sst2 rte ag_news date_iso person_json \
        --reference adapters --reference-folder rte=runs/reference/rte

A minimal spec (scripts/tasks/minimal/NAME.yaml) gives only name, type, data, prompt and the
label/target; `train` chooses the rest (adapterhub_lite/defaults.py). The reference is the adapter
trained from the tuned spec (scripts/tasks/NAME.yaml): by default the newest NAME in the registry
given by --reference, or a folder given by --reference-folder NAME=PATH (train one with
`adapterhub-lite train scripts/tasks/NAME.yaml --output PATH`). Both are scored on the full dev
split by `train`'s final eval; training time is the loop's train_seconds (steps only, evals
excluded), as each sidecar records it. A reference trained on another machine (or day) is timed
on a different clock: `--calibrate NAME …` times --calibration-steps steps of the tuned spec here
(scripts/bench_train.py, the tuned spec as written) and adds `reference_seconds_here` = reference
steps × that step time, and the time ratio against it (`time_ratio_here`). Retraining the reference
here is the exact comparison; calibration is the cheap one.

Prints a table on stderr and one JSON line on stdout: per task the primary metric of both, the
score ratio (goal ≥ 0.95) and the time ratio (goal ≤ 1.0) of the finished run, and when the
minimal run's periodic evals first reached 95% of the reference (an estimate where they score a
subset of the dev rows; rte's score all 277).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def reference_folder(name: str, registry: Path, folders: dict[str, str]) -> Path:
    if name in folders:
        return Path(folders[name])
    sys.path.insert(0, str(ROOT))
    from adapterhub_lite.artifacts.registries import adapter_ref

    return adapter_ref(name, registry)[1]


def record(folder: Path) -> dict:
    meta = json.loads((folder / "adapterhub.json").read_text())
    primary = meta["task"]["metric"][0]
    state = meta["train_state"]
    evals = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {"metric": primary, "score": meta["metrics"][primary], "train_seconds": state["train_seconds"],
            "steps": state["steps"], "stopped_by": state["stopped_by"], "eval_rows": meta["task"]["train"]["eval_samples"],
            "evals": [(r["step"], r[primary]) for r in evals if primary in r]}


def first_reached(run: dict, goal: float) -> dict | None:
    """The first periodic eval at or above `goal`: its step and the training seconds to it (steps × the run's mean step)."""
    for step, score in run["evals"]:
        if score >= goal:
            return {"step": step, "score": score, "seconds": round(step * run["train_seconds"] / run["steps"], 1), "eval_rows": run["eval_rows"]}
    return None


def step_seconds(name: str, steps: int) -> float:
    """Mean seconds per step of the tuned spec on this machine (scripts/bench_train.py: the library's train(), 8-bit)."""
    cmd = [sys.executable, str(ROOT / "scripts/bench_train.py"), str(ROOT / "scripts/tasks" / f"{name}.yaml"), "--steps", str(steps),
           "--dtypes", "auto", "--quantizations", "8bit"]
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["auto_8bit_mean_ms_per_step"] / 1000


def _reached(r: dict) -> str:
    at = r["first_at_95_percent"]
    return "never" if not at else f"step {at['step']} ({at['score']:.4f} on {at['eval_rows']} rows), ~{at['seconds']} s, time ratio {r['reached_95_percent_time_ratio']}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="+", default=["sst2", "rte", "ag_news", "date_iso", "person_json"])
    ap.add_argument("--output", default="runs/defaults", help="where the minimal-spec adapters are written")
    ap.add_argument("--reference", default="adapters", help="registry holding the tuned adapters")
    ap.add_argument("--reference-folder", nargs="*", default=[], metavar="NAME=PATH", help="a tuned adapter's folder, per task")
    ap.add_argument("--skip-training", action="store_true", help="compare the folders already under --output")
    ap.add_argument("--calibrate", nargs="*", default=[], metavar="NAME", help="tasks whose reference was timed on another machine")
    ap.add_argument("--calibration-steps", type=int, default=20)
    args = ap.parse_args()
    folders = dict(item.split("=", 1) for item in args.reference_folder)
    rows = {}
    for name in args.tasks:
        out = Path(args.output) / name
        if not args.skip_training:
            cmd = [sys.executable, "-m", "adapterhub_lite.cli", "train", str(ROOT / "scripts/tasks/minimal" / f"{name}.yaml"),
                   "--output", str(out), "--overwrite", "--no-progress"]
            print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
            subprocess.run(cmd, check=True, stdout=sys.stderr)  # stdout is this script's one JSON line
        ours, ref = record(out), record(reference_folder(name, Path(args.reference), folders))
        rows[name] = {"metric": ref["metric"], "minimal": ours["score"], "reference": ref["score"],
                      "score_ratio": round(ours["score"] / ref["score"], 4) if ref["score"] else None,
                      "minimal_seconds": ours["train_seconds"], "reference_seconds": ref["train_seconds"],
                      "time_ratio": round(ours["train_seconds"] / ref["train_seconds"], 3),
                      "minimal_steps": ours["steps"], "stopped_by": ours["stopped_by"], "reference_steps": ref["steps"],
                      # periodic evals score eval_samples dev rows (rte: all of them), so this is an estimate elsewhere
                      "first_at_95_percent": first_reached(ours, 0.95 * ref["score"])}
    for name in args.calibrate:
        seconds = step_seconds(name, args.calibration_steps)
        r = rows[name]
        r["reference_seconds_here"] = round(seconds * r["reference_steps"], 1)
        r["time_ratio_here"] = round(r["minimal_seconds"] / r["reference_seconds_here"], 3)
    for r in rows.values():
        reached, clock = r["first_at_95_percent"], r.get("reference_seconds_here", r["reference_seconds"])
        r["reached_95_percent_time_ratio"] = round(reached["seconds"] / clock, 3) if reached else None
    print("| task | metric | minimal | reference | ratio | minimal s (steps, stop) | reference s (steps) | time ratio | 95% first reached |", file=sys.stderr)
    print("|---|---|---|---|---|---|---|---|---|", file=sys.stderr)
    for name, r in rows.items():
        print(f"| {name} | {r['metric']} | {r['minimal']:.4f} | {r['reference']:.4f} | {r['score_ratio']} | "
              f"{r['minimal_seconds']} ({r['minimal_steps']}, {r['stopped_by']}) | {r['reference_seconds']} ({r['reference_steps']}) | "
              f"{r['time_ratio']}" + (f" (here: {r['reference_seconds_here']} s, {r['time_ratio_here']})" if "time_ratio_here" in r else "") +
              f" | {_reached(r)} |", file=sys.stderr)
    ok = all(r["score_ratio"] is not None and r["score_ratio"] >= 0.95 and r.get("time_ratio_here", r["time_ratio"]) <= 1.0 for r in rows.values())
    reached = all(r["reached_95_percent_time_ratio"] is not None and r["reached_95_percent_time_ratio"] <= 1.0 for r in rows.values())
    print(json.dumps({"bench": "defaults", "tasks": rows, "all_within_goal": ok, "all_reached_95_percent_in_time": reached}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
