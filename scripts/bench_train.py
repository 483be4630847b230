"""Training benchmark: train tokens/s, ms per step and peak memory for each dtype × quantization, one JSON line.

Every combination runs the library's own `train()` on the same spec (what `adapterhub-lite train` runs), in a
fresh child process so that its peak memory (CUDA: max allocated; CPU: max RSS) is its own. Periodic evals and
checkpoints are pushed past the last step and the dev split is cut to --dev-rows rows, so the run measures
training; the final eval and the routing sample still run (outside the timed loop, as in the sidecar).

Per combination (keys prefixed `<dtype>_<quantization>_`):
- `tokens_per_s`: what the sidecar records (all steps, the first included);
- `steady_ms_per_step`: median time per optimizer step after --warmup-steps, from an optimizer step hook (CUDA
  events on a GPU, so the hook adds no host sync); `steady_tokens_per_s`: mean tokens per step ÷ mean steady time;
- `peak_memory_mb`, and ratios to the first combination listed (`speedup`, `memory_ratio`).
- With `--processes 1 N`: each combination also runs data-parallel under torchrun with N processes (keys
  `<dtype>_<quantization>_p<N>_…`; batch_size rows per process, so the global batch grows with N) and
  `…_p<N>_scaling` = its tokens/s ÷ one process's. On a CPU-only machine the processes share the cores: read
  that figure as a correctness run, not as a speed claim.

    python scripts/bench_train.py [scripts/tasks/sst2.yaml] --dtypes fp32 bf16 --quantizations 8bit none --steps 30 \\
        [--base smollm2-135m|FOLDER] [--device cuda] [--processes 1 8] [key=value ...]   # trailing spec overrides, as on the CLI
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

ROOT = Path(__file__).resolve().parent.parent  # spec data paths are tried here when the cwd lacks them
SPEC = ROOT / "scripts" / "tasks" / "sst2.yaml"


def _data_overrides(spec_path: str, overrides: list[str], dev_rows: int, tmp: Path) -> list[str]:
    """Overrides that point data.train/dev at files that exist, the dev split cut to dev_rows rows."""
    from adapterhub_lite.core.data import load_split
    from adapterhub_lite.core.spec import load_spec

    spec = load_spec(spec_path, overrides)
    out = []
    for key in ("train", "dev"):
        src = getattr(spec.data, key)
        if not src.startswith("hf:") and not Path(src).is_file() and (ROOT / src).is_file():
            src = str(ROOT / src)  # relative to the project root rather than the cwd
        if key == "dev":
            ds, _ = load_split(src)
            src = str(tmp / "dev.jsonl")
            ds.select(range(min(dev_rows, len(ds)))).to_json(src, lines=True)
        out.append(f"data.{key}={src}")
    return out


def run_one(args, dtype: str, quantization: str) -> dict:
    """Train once in this process and return the combination's figures."""
    from adapterhub_lite.core.spec import TaskSpec, load_spec
    from adapterhub_lite.training.recipes.train import train

    cuda = torch.device(args.device).type == "cuda"
    marks: list = []  # one per optimizer step: a CUDA event (recorded in stream order, no sync) or a host time

    def mark(*_):
        if cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            marks.append(ev)
        else:
            marks.append(time.perf_counter())

    # Under torchrun every process must name the same run folder: the parent's (BENCH_TRAIN_DIR).
    shared = os.environ.get("BENCH_TRAIN_DIR")
    with (contextlib.nullcontext(shared) if shared else tempfile.TemporaryDirectory(prefix="bench-train-")) as tmp:
        tmp = Path(tmp)
        fixed = [f"base={args.base}", f"quantization={quantization}", f"train.max_steps={args.steps}", "train.max_minutes=0",
                 "train.eval_every=1000000000", "train.checkpoint_every=1000000000", "train.patience=0"]
        if "dtype" in TaskSpec.__dataclass_fields__:
            fixed.append(f"dtype={dtype}")
        elif dtype not in ("auto", "fp32"):
            raise SystemExit(f"error: dtype {dtype} needs the spec key `dtype`; this checkout trains in fp32 only")
        overrides = args.overrides + fixed
        overrides += _data_overrides(args.spec, overrides, args.dev_rows, tmp)
        spec = load_spec(args.spec, overrides)
        handle = register_optimizer_step_post_hook(mark)
        try:
            out = train(spec, tmp / "run", device=args.device, progress=False, command="bench_train.py")
        finally:
            handle.remove()
        if os.environ.get("RANK", "0") != "0":
            return {}  # rank 0 reports
        meta = json.loads((out / "adapterhub.json").read_text())
        history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        losses = [r["loss"] for r in history if "loss" in r]
    if cuda:
        torch.cuda.synchronize()
        gaps = [a.elapsed_time(b) / 1000 for a, b in zip(marks, marks[1:])]
    else:
        gaps = [b - a for a, b in zip(marks, marks[1:])]
    steady = gaps[args.warmup_steps - 1:] if args.warmup_steps >= 1 else gaps  # gap k ends at step k + 2
    state, eff = meta["train_state"], meta["efficiency"]
    per_step = state["tokens"] / max(state["steps"], 1)
    return {
        "tokens_per_s": eff["train_tokens_per_s"],
        "steady_tokens_per_s": round(per_step / statistics.mean(steady), 1) if steady else None,
        "steady_ms_per_step": round(1000 * statistics.median(steady), 2) if steady else None,
        "mean_ms_per_step": round(1000 * state["train_seconds"] / max(state["steps"], 1), 2),
        "peak_memory_mb": eff["peak_memory_mb"],
        "steps": state["steps"], "tokens": state["tokens"], "tokens_per_step": round(per_step, 1),
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
        "dtype_seen": meta.get("dtype") or meta.get("base", {}).get("dtype") or meta.get("efficiency", {}).get("dtype"),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", nargs="?", default=str(SPEC))
    ap.add_argument("overrides", nargs="*", help="spec overrides, dotted.key=value")
    ap.add_argument("--dtypes", nargs="+", default=["auto"], choices=("auto", "bf16", "fp16", "fp32"))
    ap.add_argument("--quantizations", nargs="+", default=["8bit"], choices=("8bit", "4bit", "none"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup-steps", type=int, default=5, help="steps left out of the steady figures (kernel set-up, caches)")
    ap.add_argument("--dev-rows", type=int, default=32, help="dev rows the final eval reads (it is not timed)")
    ap.add_argument("--base", default="smollm2-135m", help="a built-in name or a local model folder (e.g. from make_random_model.py)")
    ap.add_argument("--device", default=None, help="default: adapterhub_lite's default_device()")
    ap.add_argument("--combo-timeout", type=float, default=None, help="seconds for each combination before it is recorded as failed")
    ap.add_argument("--processes", type=int, nargs="+", default=[1], help="process counts to run each combination with (torchrun)")
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)  # DTYPE:QUANT, the child process
    args = ap.parse_args()
    if "=" in args.spec:  # no spec given, only overrides
        args.overrides, args.spec = [args.spec, *args.overrides], str(SPEC)
    if args.steps <= args.warmup_steps + 1:
        ap.error(f"--steps {args.steps} leaves no steady steps after --warmup-steps {args.warmup_steps}; pass more steps")
    from adapterhub_lite.model.backbone import default_device

    args.device = args.device or default_device()
    if args.only:
        one = run_one(args, *args.only.split(":"))
        if os.environ.get("RANK", "0") == "0":  # data-parallel: rank 0 reports the run (its tokens are the global batch's)
            print("BENCH_TRAIN " + json.dumps(one), flush=True)
        return

    combos = [(d, q, n) for d in args.dtypes for q in args.quantizations for n in args.processes]
    cuda = torch.device(args.device).type == "cuda"
    result = {"spec": Path(args.spec).name, "base": args.base, "device": torch.cuda.get_device_name() if cuda else "cpu",
              "threads": torch.get_num_threads(), "steps": args.steps, "warmup_steps": args.warmup_steps, "first": None}
    first = None
    alone = {}
    for d, q, n in combos:
        tag = f"{d}_{q}" if args.processes == [1] else f"{d}_{q}_p{n}"
        cmd = [sys.executable, __file__, *sys.argv[1:], "--only", f"{d}:{q}"]
        if n > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), *cmd[1:]]
        t0 = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory(prefix="bench-train-") as run_dir:
                env = {**os.environ, "PYTHONUNBUFFERED": "1", "BENCH_TRAIN_DIR": run_dir}
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.combo_timeout, env=env)
            sys.stderr.write(proc.stderr)
            line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("BENCH_TRAIN ")), None)
            if proc.returncode or line is None:
                last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
                raise RuntimeError(last[:300])
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            result[f"{tag}_error"] = str(exc) if isinstance(exc, RuntimeError) else f"timed out after {args.combo_timeout} s"
            print(f"bench_train: {tag} failed: {result[f'{tag}_error']}", file=sys.stderr)
            continue
        one = json.loads(line[len("BENCH_TRAIN "):])
        one["wall_s"] = round(time.perf_counter() - t0, 1)
        result.update({f"{tag}_{k}": v for k, v in one.items()})
        if first is None:  # ratios are to the first combination that ran
            first, result["first"] = one, tag
        if first.get("steady_tokens_per_s") and one.get("steady_tokens_per_s"):
            result[f"{tag}_speedup"] = round(one["steady_tokens_per_s"] / first["steady_tokens_per_s"], 3)
        result[f"{tag}_memory_ratio"] = round(one["peak_memory_mb"] / first["peak_memory_mb"], 3)
        if n == 1:
            alone[(d, q)] = one
        elif (d, q) in alone and alone[(d, q)].get("tokens_per_s"):
            result[f"{tag}_scaling"] = round(one["tokens_per_s"] / alone[(d, q)]["tokens_per_s"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
