"""Training benchmark: tokens/s, ms per step and peak memory per dtype × quantization and of plain peft, one JSON line.

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

Baselines (`--baselines plain_loop plain_same_rows hf_trainer`, the default; `--baselines none` skips them): what a
user would pick instead of us, plain peft + transformers, each in its own child process with a fresh backbone loaded
as ours loads it (load_backbone: same weights, dtype and quantization; the first --dtypes and --quantizations
listed), the same adapter config (make_config on the resolved spec, seeded as ours), AdamW at the spec's lr and
weight_decay, the spec's schedule and warmup, the same batch size, grad_accum and number of steps. Each row is the
rendered prompt followed by its answer (classification: the gold label word; generation: the target + EOS), as
token ids (prompt with special tokens, answer as the continuation after one space, tokenized as ours tokenizes
them), cut to train.max_length by dropping the prompt's start (as ours does, so the answer is never cut); `labels`
are the ids with prompt and padding positions at -100, and batches are right-padded to their longest row. The model
is called as `model(input_ids, attention_mask, labels=labels).loss`: HF's loss, which projects every position onto
the whole vocabulary (ours projects only the positions the loss reads).
- `plain_loop`: a minimal PyTorch loop as peft's docs write it: rows in a seeded random order (a DataLoader with
  shuffle), loss → backward → step → schedule → zero_grad (no clipping, no autocast);
- `plain_same_rows`: the same loop reading the very rows in the very order ours reads them (our length-bucketed
  sampler, progress.next_rows), so that the comparison isolates the work per step from padding;
- `hf_trainer`: transformers.Trainer (TrainingArguments with the same steps, batch, lr, weight_decay, schedule,
  warmup, max_grad_norm; bf16/fp16 as the dtype; logging, saving and eval off) on the same tokenized rows.
Per baseline X (keys `X_…`): `tokens_per_s` (all steps, the first included), `steady_ms_per_step`,
`steady_tokens_per_s`, `peak_memory_mb` measured as above; `tokens` = the non-padding tokens the model was fed
(counted by a forward hook), `sequences_per_step`, `pad_fraction` (padding ÷ padded tokens). The ratios
`ours_over_X_tokens_per_s`, `ours_over_X_ms_per_step` (our steady ms ÷ theirs) and `ours_over_X_peak_memory` compare
them to the first combination. What each side reads: a baseline, one sequence per row (prompt + gold answer); ours,
for classification the prompt alone when every label is one token (all labels scored at its last position), else
one sequence per (row, label) pair; for generation the prompt + target + EOS (`ours_sequences_per_step`). Each
side's tokens/s counts the tokens it reads.

`--rounds N` runs all of it N times (the 2nd, 4th … rounds run the baselines before ours) and reports each figure's median over
the rounds; a ratio is the median of the rounds' own ratios, listed per round as `<key>_rounds`. On a shared machine
the same run repeated minutes apart can move by tens of percent, so a ratio read against a goal should come from
several rounds.

    python scripts/bench_train.py [scripts/tasks/sst2.yaml] --dtypes fp32 bf16 --quantizations 8bit none --steps 30 \\
        [--base smollm2-135m|FOLDER] [--device cuda] [--processes 1 8] [--baselines plain_loop hf_trainer|none] [--rounds 3] \\
        [key=value ...]   # trailing spec overrides, as on the CLI (before the options that take lists)
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
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
BASELINES = ("plain_loop", "plain_same_rows", "hf_trainer")


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


class Clock:
    """One mark per optimizer step (register_optimizer_step_post_hook(clock.mark)): a CUDA event, recorded in stream
    order without a host sync, or a host time on the CPU."""

    def __init__(self, cuda: bool):
        self.cuda, self.marks = cuda, []

    def now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def mark(self, *_):
        self.marks.append(self.now())

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1000 if self.cuda else b - a

    def gaps(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
        return [self.seconds(a, b) for a, b in zip(self.marks, self.marks[1:])]


def steady_figures(gaps: list[float], warmup_steps: int, tokens_per_step: float) -> dict:
    """Median ms per step and tokens/s over the steps after the first warmup_steps (gap k ends at step k + 2)."""
    steady = gaps[warmup_steps - 1:] if warmup_steps >= 1 else gaps
    return {"steady_tokens_per_s": round(tokens_per_step / statistics.mean(steady), 1) if steady else None,
            "steady_ms_per_step": round(1000 * statistics.median(steady), 2) if steady else None}


def bench_spec(args, dtype: str, quantization: str, tmp: Path):
    """The spec every side trains: the user's spec and overrides, this combination, periodic evals and checkpoints
    pushed past the last step, no learning-rate warm-up when the spec's is as long as --steps, data paths that exist
    and the dev split cut to --dev-rows rows (written under tmp)."""
    from adapterhub_lite.core.spec import TaskSpec, load_spec

    fixed = [f"base={args.base}", f"quantization={quantization}", f"train.max_steps={args.steps}", "train.max_minutes=0",
             "train.eval_every=1000000000", "train.checkpoint_every=1000000000", "train.patience=0"]
    if "dtype" in TaskSpec.__dataclass_fields__:
        fixed.append(f"dtype={dtype}")
    elif dtype not in ("auto", "fp32"):
        raise SystemExit(f"error: dtype {dtype} needs the spec key `dtype`; this checkout trains in fp32 only")
    overrides = args.overrides + fixed
    overrides += _data_overrides(args.spec, overrides, args.dev_rows, tmp)
    spec = load_spec(args.spec, overrides)
    if spec.train.warmup_steps >= args.steps:
        # train refuses a warm-up as long as the run (the rate would never reach train.lr): sst2.yaml's 30 in the default
        # 30 steps. Speed does not depend on the rate, so such a bench warms up over none of its steps, every side alike.
        spec = load_spec(args.spec, overrides + ["train.warmup_steps=0"])
    return spec


def run_one(args, dtype: str, quantization: str) -> dict:
    """Train once in this process and return the combination's figures."""
    from transformers import AutoTokenizer

    from adapterhub_lite.model.heads import label_token_ids
    from adapterhub_lite.model.weights import resolve as base_folder
    from adapterhub_lite.training.recipes.train import train

    clock = Clock(torch.device(args.device).type == "cuda")
    # Under torchrun every process must name the same run folder: the parent's (BENCH_TRAIN_DIR).
    shared = os.environ.get("BENCH_TRAIN_DIR")
    with (contextlib.nullcontext(shared) if shared else tempfile.TemporaryDirectory(prefix="bench-train-")) as tmp:
        tmp = Path(tmp)
        spec = bench_spec(args, dtype, quantization, tmp)
        handle = register_optimizer_step_post_hook(clock.mark)
        try:
            out = train(spec, tmp / "run", device=args.device, progress=False, command="bench_train.py")
        finally:
            handle.remove()
        if os.environ.get("RANK", "0") != "0":
            return {}  # rank 0 reports
        meta = json.loads((out / "adapterhub.json").read_text())
        history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        losses = [r["loss"] for r in history if "loss" in r]
    state, eff = meta["train_state"], meta["efficiency"]
    per_step = state["tokens"] / max(state["steps"], 1)
    per_row = 1  # sequences a row runs: classification with a multi-token label runs one per (row, label)
    if spec.type == "classification":
        labels = label_token_ids(AutoTokenizer.from_pretrained(base_folder(spec.base)[0]), spec)
        per_row = 1 if max(len(t) for t in labels) == 1 else len(labels)
    return {
        "tokens_per_s": eff["train_tokens_per_s"],
        **steady_figures(clock.gaps(), args.warmup_steps, per_step),
        "mean_ms_per_step": round(1000 * state["train_seconds"] / max(state["steps"], 1), 2),
        "peak_memory_mb": eff["peak_memory_mb"],
        "steps": state["steps"], "tokens": state["tokens"], "tokens_per_step": round(per_step, 1),
        "sequences_per_step": state.get("global_batch", spec.train.batch_size * spec.train.grad_accum) * per_row,
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
        "dtype_seen": meta.get("dtype") or meta.get("base", {}).get("dtype") or meta.get("efficiency", {}).get("dtype"),
    }


def plain_examples(spec, split, tokenizer) -> tuple[list[dict], list[int]]:
    """Every train row as a plain fine-tuning example, and our sampler's length key of each row.

    An example is {"input_ids": prompt + answer ids, "labels": the same with the prompt at -100}: the answer is the gold
    label word (classification) or the target + EOS (generation), tokenized as ours tokenizes it, and the prompt keeps
    its end so that the whole fits in train.max_length. The lengths are those SingleTask.__init__ buckets rows by.
    """
    from adapterhub_lite.model.heads import keep_end, label_token_ids

    max_length = spec.train.max_length
    prompts = split.prompt_ids(tokenizer)
    if spec.type == "classification":
        words = label_token_ids(tokenizer, spec)
        answers = [words[a] for a in split.answers]
        lengths = [len(p) for p in prompts]
    else:
        targets = split.answer_ids(tokenizer)
        answers = [(list(a) + [tokenizer.eos_token_id])[: max_length - 1] for a in targets]
        lengths = [len(p) + len(a) for p, a in zip(prompts, targets)]
    examples = []
    for p, a in zip(prompts, answers):
        kept = keep_end(p, max_length - len(a))
        examples.append({"input_ids": kept + a, "labels": [-100] * len(kept) + a})
    return examples, lengths


def pad_collator(pad_id: int):
    """Right-pad a list of examples to its longest: input_ids (pad_id), attention_mask, labels (-100 on padding)."""
    def collate(rows: list[dict]) -> dict:
        width = max(len(r["input_ids"]) for r in rows)
        out = {"input_ids": torch.full((len(rows), width), pad_id, dtype=torch.long),
               "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
               "labels": torch.full((len(rows), width), -100, dtype=torch.long)}
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            out["input_ids"][i, :n] = torch.tensor(r["input_ids"])
            out["attention_mask"][i, :n] = 1
            out["labels"][i, :n] = torch.tensor(r["labels"])
        return out
    return collate


class FedCounter:
    """What the model is fed, from a forward pre-hook: non-padding tokens (summed on the device: no host sync),
    sequences and padded positions."""

    def __init__(self, model: torch.nn.Module):
        self.tokens, self.sequences, self.padded = 0, 0, 0
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, _module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        self.tokens = self.tokens + (mask.sum() if mask is not None else ids.numel())
        self.sequences += ids.shape[0]
        self.padded += ids.numel()

    def read(self) -> int:
        return int(self.tokens)


def run_baseline(args, name: str) -> dict:
    """Train plain peft + transformers once in this process (see the module docstring) and return its figures."""
    from peft import get_peft_model
    from transformers import get_scheduler

    from adapterhub_lite.core.data import load_task_data
    from adapterhub_lite.model.adapter import make_config
    from adapterhub_lite.model.backbone import load_backbone
    from adapterhub_lite.training.defaults import resolve
    from adapterhub_lite.training.progress import Cursor, next_rows, peak_memory_mb, seed_everything

    dtype, quantization = args.dtypes[0], args.quantizations[0]
    cuda = torch.device(args.device).type == "cuda"
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        spec = bench_spec(args, dtype, quantization, Path(tmp))
        data = load_task_data(spec)
    backbone = load_backbone(spec.base, spec.quantization, args.device, dtype=spec.dtype)  # this child's own fresh copy
    spec = resolve(spec, data, backbone.model, backbone.tokenizer).spec  # what ours trains with (lr, warmup, max_length …)
    t, tok, device = spec.train, backbone.tokenizer, backbone.device
    examples, lengths = plain_examples(spec, data["train"], tok)
    if t.batch_size > len(examples):
        raise SystemExit(f"error: train.batch_size={t.batch_size} but the train split has {len(examples)} rows")
    seed_everything(t.seed)  # as ours, before the adapter's random init
    model = get_peft_model(backbone.model, make_config(spec.method, spec.method_args, backbone.model))
    collate = pad_collator(tok.pad_token_id)
    fed = FedCounter(model)
    clock = Clock(cuda)
    losses: list = []  # each micro-batch's loss (left on the device until the end)
    loss_mean = None
    handle = register_optimizer_step_post_hook(clock.mark)
    try:
        if name == "hf_trainer":
            start, loss_mean = _hf_trainer(model, tok, examples, collate, t, backbone.dtype, cuda, clock)
        else:
            if name == "plain_loop":
                loader = torch.utils.data.DataLoader(examples, batch_size=t.batch_size, shuffle=True, drop_last=True,
                                                     collate_fn=collate, generator=torch.Generator().manual_seed(t.seed))
                batches = (batch for _ in itertools.count() for batch in loader)  # epoch after epoch
            else:  # plain_same_rows: our sampler's rows, in its order
                cursor = Cursor()
                batches = (collate([examples[i] for i in next_rows(cursor, lengths, t.batch_size, t.seed, t.grad_accum)])
                           for _ in itertools.count())
            # peft's docs' loop
            optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
            lr_scheduler = get_scheduler(t.schedule, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=t.max_steps)
            model.train()
            start = clock.now()
            for _ in range(t.max_steps):
                for _ in range(t.grad_accum):
                    batch = {k: v.to(device) for k, v in next(batches).items()}
                    loss = model(**batch).loss
                    (loss / t.grad_accum).backward()
                    losses.append(loss.detach())
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
    finally:
        handle.remove()
        fed.handle.remove()
    gaps = clock.gaps()
    seconds = clock.seconds(start, clock.marks[-1]) if clock.marks else 0.0
    tokens, steps = fed.read(), len(clock.marks)
    per_step = tokens / max(steps, 1)
    losses = [float(x) for x in losses]
    return {
        "tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
        **steady_figures(gaps, args.warmup_steps, per_step),
        "mean_ms_per_step": round(1000 * seconds / max(steps, 1), 2),
        "peak_memory_mb": round(peak_memory_mb(str(device)), 1),
        "steps": steps, "tokens": tokens, "tokens_per_step": round(per_step, 1),
        "sequences_per_step": round(fed.sequences / max(steps, 1), 1),
        "pad_fraction": round(1 - tokens / max(fed.padded, 1), 4),
        **({"loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4)} if losses else {"loss_mean": loss_mean}),
        "dtype_seen": backbone.dtype_name,
    }


def _hf_trainer(model, tokenizer, examples, collate, t, dtype: torch.dtype, cuda: bool, clock: Clock):
    """transformers.Trainer on the examples; returns the clock's start (when training began) and the run's mean loss."""
    import datasets
    from transformers import Trainer, TrainerCallback, TrainingArguments

    starts = []

    class Watch(TrainerCallback):
        def on_train_begin(self, *_, **__):
            starts.append(clock.now())

    with tempfile.TemporaryDirectory(prefix="bench-train-hf-") as out:
        targs = TrainingArguments(
            output_dir=out, max_steps=t.max_steps, per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum,
            learning_rate=t.lr, weight_decay=t.weight_decay, lr_scheduler_type=t.schedule, warmup_steps=t.warmup_steps,
            max_grad_norm=t.max_grad_norm, seed=t.seed, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, use_cpu=not cuda,
            logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True,
            dataloader_drop_last=True, remove_unused_columns=False,
        )
        if targs.n_gpu > 1:  # one GPU, as every other side: Trainer would split each batch over all visible GPUs (nn.DataParallel)
            targs._n_gpu = 1
        trainer = Trainer(model=model, args=targs, train_dataset=datasets.Dataset.from_list(examples), data_collator=collate,
                          processing_class=tokenizer, callbacks=[Watch()])
        result = trainer.train()
    loss = result.training_loss  # the mean over the run: with logging off, Trainer records nothing else
    return starts[0], round(loss, 4) if loss is not None else None


def _child(cmd: list[str], tag: str, args, result: dict) -> dict | None:
    """Run one child process and return the figures it printed (None, with `<tag>_error` in result, if it failed)."""
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
        return None
    one = json.loads(line[len("BENCH_TRAIN "):])
    one["wall_s"] = round(time.perf_counter() - t0, 1)
    result.update({f"{tag}_{k}": v for k, v in one.items()})
    return one


def _ratio(a, b) -> float | None:
    return round(a / b, 3) if a and b else None


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
    ap.add_argument("--baselines", nargs="+", default=list(BASELINES), choices=(*BASELINES, "none"),
                    help="plain peft + transformers runs to compare with, on the first dtype and quantization (none: skip)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every combination and baseline this many times, alternating which side goes first; report medians")
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)  # DTYPE:QUANT, the child process
    ap.add_argument("--run-baseline", default=None, choices=BASELINES, help=argparse.SUPPRESS)  # a baseline's child process
    args = ap.parse_args()
    if "=" in args.spec:  # no spec given, only overrides
        args.overrides, args.spec = [args.spec, *args.overrides], str(SPEC)
    if args.steps <= args.warmup_steps + 1:
        ap.error(f"--steps {args.steps} leaves no steady steps after --warmup-steps {args.warmup_steps}; pass more steps")
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")
    if "none" in args.baselines and len(args.baselines) > 1:
        ap.error("--baselines none cannot be combined with a baseline")
    from adapterhub_lite.model.backbone import default_device

    args.device = args.device or default_device()
    if args.only:
        one = run_one(args, *args.only.split(":"))
        if os.environ.get("RANK", "0") == "0":  # data-parallel: rank 0 reports the run (its tokens are the global batch's)
            print("BENCH_TRAIN " + json.dumps(one), flush=True)
        return
    if args.run_baseline:
        print("BENCH_TRAIN " + json.dumps(run_baseline(args, args.run_baseline)), flush=True)
        return

    cuda = torch.device(args.device).type == "cuda"
    head = {"spec": Path(args.spec).name, "base": args.base, "device": torch.cuda.get_device_name() if cuda else "cpu",
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "steps": args.steps, "warmup_steps": args.warmup_steps,
            # on cores that other work shares, each side's threads contend with it and a ratio moves by several times
            # (2 threads each on 2 busy cores: both sides ~8x slower, unevenly); the load says how far to trust the run
            "load_avg_1m": {"start": round(os.getloadavg()[0], 2)}}
    rounds = []
    for r in range(args.rounds):
        # the 2nd, 4th … rounds run the baselines first, so a machine that speeds up or slows down favours no side
        rounds.append(one_round(args, baselines_first=r % 2 == 1))
    head["load_avg_1m"]["end"] = round(os.getloadavg()[0], 2)
    result = {**head, **(rounds[0] if args.rounds == 1 else median_rounds(rounds)), "rounds": args.rounds}
    print(json.dumps(result))


def one_round(args, baselines_first: bool = False) -> dict:
    """Every combination, then every baseline (each in its own child process), and their ratios: one round's figures."""
    result: dict = {"first": None}
    combos = [(d, q, n) for d in args.dtypes for q in args.quantizations for n in args.processes]
    baselines = [b for b in args.baselines if b != "none"]
    theirs: dict[str, dict | None] = {}

    def run_baselines():
        for name in baselines:
            theirs[name] = _child([sys.executable, __file__, *sys.argv[1:], "--run-baseline", name], name, args, result)

    if baselines_first:
        run_baselines()
    first = None
    alone, ran = {}, {}  # (dtype, quantization) → its run in one process, its first run
    for d, q, n in combos:
        tag = f"{d}_{q}" if args.processes == [1] else f"{d}_{q}_p{n}"
        cmd = [sys.executable, __file__, *sys.argv[1:], "--only", f"{d}:{q}"]
        if n > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), *cmd[1:]]
        one = _child(cmd, tag, args, result)
        if one is None:
            continue
        if first is None:  # ratios are to the first combination that ran
            first, result["first"] = one, tag
        if first.get("steady_tokens_per_s") and one.get("steady_tokens_per_s"):
            result[f"{tag}_speedup"] = round(one["steady_tokens_per_s"] / first["steady_tokens_per_s"], 3)
        result[f"{tag}_memory_ratio"] = round(one["peak_memory_mb"] / first["peak_memory_mb"], 3)
        ran.setdefault((d, q), one)
        if n == 1:
            alone[(d, q)] = one
        elif (d, q) in alone and alone[(d, q)].get("tokens_per_s"):
            result[f"{tag}_scaling"] = round(one["tokens_per_s"] / alone[(d, q)]["tokens_per_s"], 3)
    if not baselines_first:
        run_baselines()

    if baselines:
        # ours: the first dtype × quantization, in one process when that ran (the baselines run in one process)
        ours = alone.get((args.dtypes[0], args.quantizations[0])) or ran.get((args.dtypes[0], args.quantizations[0]))
        result["baselines_on"] = f"{args.dtypes[0]}_{args.quantizations[0]}"
        if ours:
            result["ours_sequences_per_step"] = ours.get("sequences_per_step")
            result["ours_tokens_per_step"] = ours.get("tokens_per_step")
        for name in baselines:
            one = theirs.get(name)
            if one is None or not ours:
                continue
            result[f"ours_over_{name}_tokens_per_s"] = _ratio(ours.get("tokens_per_s"), one.get("tokens_per_s"))
            result[f"ours_over_{name}_steady_tokens_per_s"] = _ratio(ours.get("steady_tokens_per_s"), one.get("steady_tokens_per_s"))
            result[f"ours_over_{name}_ms_per_step"] = _ratio(ours.get("steady_ms_per_step"), one.get("steady_ms_per_step"))
            result[f"ours_over_{name}_peak_memory"] = _ratio(ours.get("peak_memory_mb"), one.get("peak_memory_mb"))
    return result


def median_rounds(rounds: list[dict]) -> dict:
    """Several rounds as one report: each figure is its median over the rounds that have it (the lower middle of an even
    count; a ratio: the median of the rounds' own ratios, each taken between runs minutes apart); every ratio also lists its value per round
    (`<key>_rounds`, None where that round failed), and every failure is kept with its round, never hidden."""
    out: dict = {}
    for key in dict.fromkeys(k for one in rounds for k in one):
        values = [one.get(key) for one in rounds]
        if key.endswith("_error"):
            out[key] = "; ".join(f"round {i + 1}: {v}" for i, v in enumerate(values) if v is not None)
            continue
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if numbers and len(numbers) == len([v for v in values if v is not None]):
            out[key] = statistics.median_low(numbers)  # a figure some round measured (an even count: the lower middle)
        else:  # a word (a tag, a dtype seen): the rounds' own when they agree
            seen = list(dict.fromkeys(json.dumps(v) for v in values if v is not None))
            out[key] = json.loads(seen[0]) if len(seen) == 1 else [json.loads(v) for v in seen]
        if key.startswith("ours_over_") or key.endswith(("_speedup", "_scaling")):
            out[f"{key}_rounds"] = values
    return out


if __name__ == "__main__":
    main()
