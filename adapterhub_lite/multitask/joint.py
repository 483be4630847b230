"""Joint multi-task training: N task LoRA adapters (+ optionally one shared) trained in one loop.

Every batch mixes rows of several tasks (chosen by a TaskSampler); each row goes through its own
task's adapter — and through the shared adapter, when there is one — in the same forward and
backward pass, by the router's per-row kernel (router/kernel.py) in training mode. The per-task
losses are combined by a weighting rule (equal, fixed, dynamic sigmoid, uncertainty).

    runs/mtl/
      <task>/        one ordinary adapter folder per task: its own factors and the shared ones
                     concatenated (rank r_shared + r_task), so it serves alone, exactly as trained
      shared/        the shared adapter by itself
      run.json       what was trained, how, and the per-task dev scores
      metrics.jsonl, curves.png   per-task losses, loss weights, sampling shares and dev metrics
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import get_scheduler

from ..adapter import make_config, save_lora, trainable_parameters
from ..backbone import autocast, load_backbone
from ..data import check_lengths, load_task_data
from ..errors import SpecError
from ..evaluate import evaluate_split, label_token_ids
from ..folder import SIDECAR, nonfinite_tensors, pyplot, save_figure, write_json, write_jsonl
from ..heads import Plan, logprobs_at, loss_plan_ids
from ..router.routing import routing_entry
from ..rowlora import RowContext, RowLoraLinear, check_lora_config
from ..spec import TaskSpec
from ..train import (
    Checkpoint,
    RunState,
    TrainingError,
    adapter_meta,
    check_resume,
    finish_folder,
    next_rows,
    peak_memory_mb,
    prepare_output,
    publish_folder,
    run_identity,
    seed_everything,
)
from .sampling import TaskSampler
from .weighting import make_weighting

SHARED = "shared"


@dataclass
class JointConfig:
    """Settings of a joint run (each task's own spec gives its prompt, labels, LoRA shape and lr)."""

    max_steps: int = 300
    batch_size: int = 16  # rows per step, mixed over tasks
    warmup_steps: int = 20
    eval_every: int = 100
    eval_samples: int = 200
    max_grad_norm: float = 1.0
    weighting: str = "dynamic"
    weighting_args: dict = field(default_factory=dict)  # alpha/beta/window (dynamic), weights (fixed)
    sampling: str = "temperature"
    temperature: float = 2.0
    shared_adapter: bool = False
    shared_r: int = 8
    max_minutes: float = 0.0
    seed: int = 0


def check_specs(specs: list[TaskSpec]) -> None:
    """Refuse, all problems at once, a set of tasks that cannot be trained jointly."""
    problems = []
    names = [s.name for s in specs]
    if len(specs) < 2:
        problems.append(f"joint training needs at least two tasks, got {names}")
    if len(set(names)) < len(names) or SHARED in names:
        problems.append(f"task names must be distinct and not {SHARED!r}, got {names}")
    problems += [f"task {s.name!r} uses method {s.method!r}; joint training trains LoRA adapters (set method: lora)"
                 for s in specs if s.method != "lora"]
    for key in ("base", "quantization", "dtype"):
        values = {s.name: getattr(s, key) for s in specs}
        if len(set(values.values())) > 1:
            problems.append(f"all tasks must share one backbone, but {key} differs: {values}")
    dropouts = {s.name: s.method_args.get("lora_dropout", 0.0) for s in specs}
    if len(set(dropouts.values())) > 1:
        problems.append(f"all tasks must use one lora_dropout (the batch shares one dropout mask), got {dropouts}")
    if problems:
        raise SpecError(problems, "joint training")


class JointLora:
    """The task adapters (+ shared) of a multi-adapter peft model, applied per row.

    peft creates, initialises and holds the parameters; its own LoRA forward is switched off and
    each of its LoRA layers gets a per-row LoRA layer (rowlora.RowLoraLinear) as its base: that one
    holds the very same parameters and adds, for row i, task[i]'s update plus the shared one.
    """

    def __init__(self, model, tasks: list[str], shared: bool, dropout: float):
        self.tasks, self.shared, self.dropout = tasks, shared, dropout
        self.layers = {name: m for name, m in model.base_model.model.named_modules() if hasattr(m, "lora_A") and m.lora_A}
        model.base_model.disable_adapter_layers()  # peft now computes only the frozen base ...
        self.device = next(model.parameters()).device
        self.context = RowContext()
        for i, task in enumerate(tasks):  # slot i: the task's own adapter after the shared one
            self.context.define(i, ([(SHARED, 1.0)] if shared else []) + [(task, 1.0)])
        self.rows: dict[str, RowLoraLinear] = {}
        for name, m in self.layers.items():
            row = RowLoraLinear(m.base_layer, self.context, dropout=dropout)
            for adapter in m.lora_A:  # ... and froze the factors too; we train them ourselves
                a, b = m.lora_A[adapter].weight, m.lora_B[adapter].weight
                a.requires_grad_(True)
                b.requires_grad_(True)
                row.put(adapter, a, b, m.scaling[adapter])
            m.base_layer = row
            self.rows[name] = row

    def route(self, tasks: list[int] | int | None):
        """Context: row i through task tasks[i]'s adapter (an int: every row; None: the plain base)."""
        return self.context.route(tasks, self.device)

    def factors(self, module: str, task: int):
        """(A, B·scale) of task `task` at `module`: its own factors after the shared ones."""
        return self.rows[module].slot_factors(task)

    def parameters(self, name: str) -> list[torch.nn.Parameter]:
        return [p for m in self.layers.values() if name in m.lora_A for p in (m.lora_A[name].weight, m.lora_B[name].weight)]

    def export(self, task: int | None) -> dict:
        """Factors of a task adapter (shared included) or, with None, of the shared adapter alone."""
        if task is None:
            return {m: (a, b * s) for m, row in self.rows.items() if SHARED in row.entries for a, b, s in [row.entries[SHARED]]}
        return {m: f for m in self.rows if (f := self.factors(m, task)) is not None}


def _attach(model, specs: list[TaskSpec], cfg: JointConfig):
    configs = {s.name: make_config("lora", s.method_args, model) for s in specs}
    for name, config in configs.items():  # what the per-row layer cannot apply is refused, not dropped
        check_lora_config(config, f"task {name!r}'s LoRA (method_args)")
    first = specs[0].name
    peft_model = get_peft_model(model, configs[first], adapter_name=first)
    for s in specs[1:]:
        peft_model.add_adapter(s.name, configs[s.name])
    if cfg.shared_adapter:  # the first task's LoRA layout (targets, dropout) at its own rank
        shared = copy.deepcopy(configs[first])
        shared.r, shared.lora_alpha = cfg.shared_r, 2 * cfg.shared_r
        peft_model.add_adapter(SHARED, shared)
    if hasattr(peft_model.get_output_embeddings(), "lora_A"):  # the loss projects picked rows, not the batch's rows
        raise SpecError(["a task targets the LM head; joint training adapts the decoder's linear layers (drop lm_head from target_modules)"], "joint training")
    return peft_model


def train_joint(specs: list[TaskSpec], output: str | Path, cfg: JointConfig | None = None, *, overwrite: bool = False,
                resume: bool = False, command: str | None = None, device: str | None = None, dtype: str | None = None,
                progress: bool = True) -> Path:
    """Train the tasks' adapters jointly; writes one adapter folder per task under `output`.

    A checkpoint is written after every eval; `resume=True` continues an interrupted run exactly
    (weights, optimizer, schedule, RNG, task sampler, loss-weighting history, data cursors).
    """
    cfg = cfg or JointConfig()
    check_specs(specs)
    output = Path(output)
    work = prepare_output(output, overwrite, resume)
    names = [s.name for s in specs]
    data = {s.name: load_task_data(s) for s in specs}  # every task validated before anything is written
    bb = load_backbone(specs[0].base, specs[0].quantization, device, dtype=dtype or specs[0].dtype)
    tok, device = bb.tokenizer, str(next(bb.model.parameters()).device)
    for s in specs:  # max_length must fit each task's longest label or target (needs the tokenizer)
        check_lengths(s, tok, data[s.name])
    seed_everything(cfg.seed)
    model = _attach(bb.model, specs, cfg)
    joint = JointLora(model, names, cfg.shared_adapter, float(specs[0].method_args.get("lora_dropout", 0.0)))
    weighting = make_weighting(cfg.weighting, names, device=bb.device, **cfg.weighting_args)
    sampler = TaskSampler({n: len(data[n]["train"]) for n in names}, cfg.sampling, cfg.temperature, seed=cfg.seed)
    labels = {s.name: label_token_ids(tok, s) if s.type == "classification" else None for s in specs}

    # Each task keeps its own learning rate; the shared adapter and the loss weights take the mean.
    mean_lr = sum(s.train.lr for s in specs) / len(specs)
    groups = [{"params": joint.parameters(s.name), "lr": s.train.lr} for s in specs]
    if cfg.shared_adapter:
        groups.append({"params": joint.parameters(SHARED), "lr": mean_lr})
    if weighting.parameters():
        groups.append({"params": weighting.parameters(), "lr": mean_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = get_scheduler("linear", opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps)
    params = [p for g in groups for p in g["params"]]

    cursors = {n: RunState() for n in names}
    lengths = {n: [len(p) for p in data[n]["train"].prompts] for n in names}  # characters: enough to bucket by
    # Each split is tokenized once, up front; a step only picks rows of ids (the tokenizer stays out of the loop).
    prompt_ids = {s.name: data[s.name]["train"].prompt_ids(tok) for s in specs}
    answers = {s.name: data[s.name]["train"].answers if labels[s.name] is not None else data[s.name]["train"].answer_ids(tok) for s in specs}
    work.mkdir(parents=True, exist_ok=True)
    history: list[dict] = []

    def record(row: dict) -> None:
        history.append(row)
        with open(work / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")

    latency: dict[str, float] = {}

    def evaluate(limit: int | None) -> dict[str, dict]:
        out = {}
        for i, s in enumerate(specs):
            with joint.route(i):
                metrics, _, seconds = evaluate_split(model, tok, s, data[s.name]["dev"], limit=limit)
            out[s.name] = {k: v for k, v in metrics.items() if k != "per_class"}
            latency[s.name] = round(1000 * seconds / min(limit or len(data[s.name]["dev"]), len(data[s.name]["dev"])), 2)
        return out

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    ckpt = Checkpoint(work)
    done, train_seconds, tokens, best, best_score, best_step = 0, 0.0, 0, None, None, 0
    if resume:
        saved = ckpt.read(opt, sched)
        with torch.no_grad():
            for n, value in saved["params"].items():
                trainable[n].copy_(value)
        sampler.load_state_dict(saved["sampler"])
        weighting.load_state_dict(saved["weighting"])
        for n, c in saved["cursors"].items():
            cursors[n] = RunState(**c)
        history[:] = saved["history"]
        done, train_seconds, tokens, best, best_score, best_step = saved["progress"]
        for s in specs:  # an edited spec or data file is refused, not silently continued
            check_resume((saved.get("run") or {}).get(s.name), run_identity(s, data[s.name]), work)
        print(f"resuming from step {done}", file=sys.stderr)
    write_jsonl(work / "metrics.jsonl", history)

    def checkpoint() -> None:
        if nonfinite_tensors(trainable):
            raise TrainingError(f"adapter weights are not finite at step {step}; the last good checkpoint is kept — lower the tasks' train.lr and train again")
        ckpt.write({"run": {s.name: run_identity(s, data[s.name]) for s in specs},
                    "params": {n: p.detach() for n, p in trainable.items()}, "sampler": sampler.state_dict(),
                    "weighting": weighting.state_dict(), "cursors": {n: c.__dict__ for n, c in cursors.items()},
                    "history": history, "progress": (step, train_seconds, tokens, best, best_score, best_step)}, opt, sched)

    start, stopped_by, step = time.monotonic() - train_seconds, "max_steps", done
    for step in range(done + 1, cfg.max_steps + 1):
        model.train()
        t0 = time.perf_counter()
        draws = sampler.draw_batch(cfg.batch_size)
        plans: dict[int, Plan] = {}  # task index → its rows' plan
        for i, s in enumerate(specs):
            k = draws.count(s.name)
            if k:
                rows = next_rows(cursors[s.name], lengths[s.name], k, cfg.seed + 1000 * i)
                plans[i] = loss_plan_ids([prompt_ids[s.name][j] for j in rows], [answers[s.name][j] for j in rows],
                                         s.train.max_length, labels[s.name], tok.eos_token_id)
        with autocast(bb):  # bf16/fp16 activations; the fp32 adapter weights meet them in low-precision matmuls
            losses = {names[i]: v.float() for i, v in joint_losses(model, tok.pad_token_id, joint, plans).items()}
        used = weighting.weights()  # the weights this step's loss is combined with
        total = weighting.combine(losses)
        if not torch.isfinite(total):  # one host read per step, which the metrics row below makes anyway
            raise TrainingError(f"the joint loss is {total.item()} at step {step}; the last good checkpoint is kept — lower the tasks' train.lr and train again")
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        train_seconds += time.perf_counter() - t0
        tokens += sum(len(q) for p in plans.values() for q in p.seqs)
        record({"step": step, "loss": round(total.item(), 5), **{f"loss/{n}": round(v.item(), 5) for n, v in losses.items()},
                **{f"weight/{n}": round(w, 4) for n, w in used.items()},
                **{f"rows/{n}": draws.count(n) for n in names}})
        out_of_time = cfg.max_minutes > 0 and time.monotonic() - start > cfg.max_minutes * 60
        if step % cfg.eval_every == 0 or step == cfg.max_steps or out_of_time:
            scores = evaluate(cfg.eval_samples)
            for s in specs:
                sampler.observe(s.name, scores[s.name][s.primary_metric])
            mean = sum(scores[s.name][s.primary_metric] for s in specs) / len(specs)
            record({"step": step, **{f"dev/{n}/{k}": v for n, m in scores.items() for k, v in m.items()}, "dev/mean": round(mean, 4),
                    **{f"p/{n}": round(p, 4) for n, p in sampler.probabilities().items()}})
            if progress:
                print(f"step {step}: dev " + ", ".join(f"{s.name} {scores[s.name][s.primary_metric]:.4f}" for s in specs), file=sys.stderr)
            if best_score is None or mean > best_score:  # keep the best mean, not the last
                best_score, best_step, best = mean, step, {n: p.detach().clone() for n, p in trainable.items()}
            checkpoint()
        if out_of_time:
            stopped_by = "max_minutes"
            break

    if best is not None:
        with torch.no_grad():
            for n, value in best.items():
                trainable[n].copy_(value)
    final = evaluate(None)
    state = {"device": device, "steps": step, "best_step": best_step, "stopped_by": stopped_by, "train_seconds": round(train_seconds, 1), "tokens": tokens,
             "train_tokens_per_s": round(tokens / max(train_seconds, 1e-9), 1), "peak_memory_mb": round(peak_memory_mb(device), 1),
             "latency_ms_per_example": latency}
    _write_outputs(work, specs, cfg, bb, data, model, joint, final, history, state, command)
    publish_folder(work / "out", output)
    shutil.rmtree(work, ignore_errors=True)
    return output


def joint_losses(model, pad_id: int, joint: JointLora, plans: dict[int, Plan], spread: float = 1.5) -> dict[int, torch.Tensor]:
    """Every task's loss from one pass over all their rows, each row through its own task's adapter.

    Tasks differ in length (an RTE pair is ten SST-2 phrases long), so one padded rectangle would
    spend most of its compute on padding. The rows are therefore sorted by length and cut into
    buckets whose longest row is at most `spread` × their shortest; each bucket is one mixed-task
    forward through the kernel, and the log-probs are put back in order before the losses — so the
    result (and its gradient) is that of a single pass.
    """
    seqs, rows, cols, owner, counts = [], [], [], [], []
    for task, plan in plans.items():
        offset = len(seqs)
        seqs += plan.seqs
        rows += [offset + r for r in plan.rows]
        cols += plan.cols
        owner += [task] * len(plan.seqs)
        counts.append(len(plan.rows))
    device = next(model.parameters()).device
    buckets, order = [], sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for i in order:
        if buckets and len(seqs[i]) <= spread * len(seqs[buckets[-1][0]]):
            buckets[-1].append(i)
        else:
            buckets.append([i])
    picks_of = {}  # seq → its picks (positions in the flat rows/cols lists)
    for j, r in enumerate(rows):
        picks_of.setdefault(r, []).append(j)
    parts, where = [], []
    for bucket in buckets:
        local = {seq: k for k, seq in enumerate(bucket)}
        picks = [j for seq in bucket for j in picks_of.get(seq, [])]
        with joint.route([owner[seq] for seq in bucket]):
            parts.append(logprobs_at(model, pad_id, [seqs[seq] for seq in bucket], [local[rows[j]] for j in picks], [cols[j] for j in picks]))
        where += picks
    logp = torch.cat(parts)[torch.argsort(torch.tensor(where, device=device))]  # back to the plans' order
    return {task: plan.finish(part) for (task, plan), part in zip(plans.items(), logp.split(counts))}


def _write_outputs(work: Path, specs, cfg: JointConfig, bb, data, model, joint: JointLora, final: dict, history, state, command) -> None:
    out = work / "out"
    out.mkdir()
    run = {"tasks": [s.name for s in specs], "config": asdict(cfg), "dev": final, "train_state": state,
           "base": {"name": specs[0].base, "hub_id": bb.hub_id, "fingerprint": bb.fingerprint},
           "trainable_parameters": trainable_parameters(model), "command": command or " ".join(sys.argv)}
    dropout, total = joint.dropout, run["trainable_parameters"]["total"]
    for i, s in enumerate(specs):
        folder, factors = out / s.name, joint.export(i)
        save_lora(folder, factors, bb.hub_id, dropout)
        routing = routing_entry(model, bb.tokenizer, s, folder)  # outside route(): the plain backbone's view
        own = [{"step": r["step"], "loss": r[f"loss/{s.name}"]} for r in history if f"loss/{s.name}" in r] + \
              [{"step": r["step"], **{k.split("/")[-1]: v for k, v in r.items() if k.startswith(f"dev/{s.name}/")}} for r in history if f"dev/{s.name}/{s.primary_metric}" in r]
        own_params = sum(a.numel() + b.numel() for a, b in factors.values())
        meta = adapter_meta(s, bb, data[s.name], final[s.name], routing=routing, command=command,
                            trainable_parameters={"trainable": own_params, "total": total,
                                                  "percent": round(100.0 * own_params / total, 4)},
                            efficiency={"adapter_file_bytes": (folder / "adapter_model.safetensors").stat().st_size,
                                        "peak_memory_mb": state["peak_memory_mb"], "train_tokens_per_s": state["train_tokens_per_s"],
                                        "latency_ms_per_example": state["latency_ms_per_example"][s.name], "device": state["device"]},
                            train_state={k: state[k] for k in ("steps", "best_step", "stopped_by", "train_seconds", "tokens")},
                            joint={"run": "..", "tasks": run["tasks"], "shared_adapter": cfg.shared_adapter,
                                   "weighting": cfg.weighting, "sampling": cfg.sampling})
        finish_folder(folder, meta, sorted(own, key=lambda r: r["step"]), s.primary_metric)
    if cfg.shared_adapter:
        save_lora(out / SHARED, joint.export(None), bb.hub_id, dropout)
        # A component, not a task adapter: no task spec, no metrics; every task folder already holds it.
        write_json(out / SHARED / SIDECAR, {**adapter_meta(specs[0], bb, {}, {}, routing=None, command=command), "name": SHARED,
                                            "task": None, "label_words": None, "joint": {"run": "..", "tasks": run["tasks"], "role": "shared"}})
    write_json(out / "run.json", run)
    write_jsonl(out / "metrics.jsonl", history)
    plot_joint(history, specs, out / "curves.png")


def plot_joint(history: list[dict], specs: list[TaskSpec], path: Path) -> None:
    """Per-task loss, loss weight and dev metric against step, as one PNG."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for s in specs:
        for ax, key in zip(axes, (f"loss/{s.name}", f"weight/{s.name}", f"dev/{s.name}/{s.primary_metric}")):
            pts = [(r["step"], r[key]) for r in history if key in r]
            if pts:
                ax.plot(*zip(*pts), lw=0.8, marker="o" if key.startswith("dev/") else None, label=s.name)
    for ax, title in zip(axes, ("train loss", "loss weight", "dev metric")):
        ax.set(xlabel="step", title=title)
        ax.legend(fontsize=7)
    save_figure(fig, path)
