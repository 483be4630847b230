"""Joint multi-task training: N task LoRA adapters (+ optionally one shared) trained in one loop.

Every batch mixes rows of several tasks (chosen by a TaskSampler); each row goes through its own
task's adapter — and through the shared adapter, when there is one — in the same forward and
backward pass, by the one per-row layer (rowlora.py) in training mode. The loop is the training
library's (training/loop.py), shared with single-task training. The per-task
losses are combined by a weighting rule (equal, fixed, dynamic sigmoid, uncertainty). The run's
settings, and which sets of tasks can train together, are the library's (training/joint_config.py).

    runs/mtl/
      <task>/        one ordinary adapter folder per task: its own factors and the shared ones
                     concatenated (rank r_shared + r_task), so it serves alone, exactly as trained
      shared/        the shared adapter by itself
      run.json       what was trained, how, and the per-task dev scores
      metrics.jsonl, curves.png   per-task losses, loss weights, sampling shares and dev metrics
"""

from __future__ import annotations

import copy
import shutil
import sys
from pathlib import Path

import torch
from peft import get_peft_model

from adapterhub_lite.artifacts.files import write_json, write_jsonl
from adapterhub_lite.artifacts.folder import pyplot, save_figure
from adapterhub_lite.artifacts.samples import routing_entry
from adapterhub_lite.artifacts.sidecar import base_record, build
from adapterhub_lite.core.data import load_task_data
from adapterhub_lite.core.data_checks import check_lengths, data_warnings
from adapterhub_lite.core.errors import SpecError
from adapterhub_lite.core.spec import TaskSpec
from adapterhub_lite.model.adapter import make_config, save_lora, trainable_parameters
from adapterhub_lite.model.backbone import autocast, load_backbone
from adapterhub_lite.model.evaluate import evaluate_split
from adapterhub_lite.model.heads import Plan, label_token_ids, logprobs_at, loss_items, loss_plan_ids, read_tokens
from adapterhub_lite.model.rowadapters import RowAdapters
from adapterhub_lite.model.rowconfig import check_lora_config
from adapterhub_lite.training.defaults import describe_joint, resolve_joint
from adapterhub_lite.training.joint_config import SHARED, JointConfig, check_specs
from adapterhub_lite.training.loop import LoopConfig, Recipe, StepLoss, fit
from adapterhub_lite.training.mixing import TaskSampler
from adapterhub_lite.training.output import adapter_meta, claim_output, finish_folder, publish_folder, remove_work
from adapterhub_lite.training.parallel import Parallel, local_device
from adapterhub_lite.training.progress import Cursor, joint_identity, next_rows, peak_memory_mb, seed_everything, shard
from adapterhub_lite.training.recipes.train import check_labels_trained
from adapterhub_lite.training.weighting import make_weighting


class JointLora(RowAdapters):
    """The task adapters (+ shared) of a multi-adapter peft model, applied per row.

    peft creates, initialises and holds the parameters; its own LoRA forward is switched off and
    each of its LoRA layers gets a per-row LoRA layer (rowlora.RowLoraLinear) as its base: that one
    holds the very same parameters and adds, for row i, task[i]'s update plus the shared one.
    Slot i is task i (factors(module, i): its own factors after the shared ones).
    """

    def __init__(self, model, tasks: list[str], shared: bool, dropout: float):
        self.tasks, self.shared, self.dropout = tasks, shared, dropout
        self.lora = {name: m for name, m in model.base_model.model.named_modules() if hasattr(m, "lora_A") and m.lora_A}
        model.base_model.disable_adapter_layers()  # peft now computes only the frozen base ...
        super().__init__(model.base_model.model, {name: f"{name}.base_layer" for name in self.lora}, dropout)
        for i, task in enumerate(tasks):  # slot i: the task's own adapter after the shared one
            self.define(i, ([(SHARED, 1.0)] if shared else []) + [(task, 1.0)])
        for name, m in self.lora.items():
            for adapter in m.lora_A:  # ... and froze the factors too; we train them ourselves
                a, b = m.lora_A[adapter].weight, m.lora_B[adapter].weight
                a.requires_grad_(True)
                b.requires_grad_(True)
                self.put(adapter, {name: (a, b, m.scaling[adapter])})

    def parameters(self, name: str) -> list[torch.nn.Parameter]:
        """Adapter `name`'s trainable factors (peft's own parameters), for its optimizer group."""
        return [p for m in self.lora.values() if name in m.lora_A for p in (m.lora_A[name].weight, m.lora_B[name].weight)]

    def names(self) -> list[str]:
        """The adapters trained: the tasks' and the shared one."""
        return self.tasks + ([SHARED] if self.shared else [])

    def export(self, task: int | None) -> dict:
        """Factors of a task adapter (shared included) or, with None, of the shared adapter alone."""
        if task is None:
            return {m: (a, b * s) for m, row in self.layers.items() if SHARED in row.entries for a, b, s in [row.entries[SHARED]]}
        return self.export_slot(task)


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


class Joint(Recipe):
    """Several task adapters (+ shared) in one pass: each row through its own task's adapter.

    A step's global batch (all its micro-batches) is drawn by the task sampler (the same on every process); each task's rows
    come from its own data cursor, and each process computes its share of the (task, row) pairs. A task's loss is its
    share's sum over the step's count for that task, so the losses the weighting rule sees (all-reduced) are the global
    batch's: every process takes the same decision, and grad_accum 4 × 4 rows trains as one batch of 16.
    """

    def __init__(self, specs: list[TaskSpec], cfg: JointConfig, model, joint: JointLora, backbone, data: dict, processes: int = 1):
        self.specs, self.cfg, self.model, self.joint, self.backbone, self.data = specs, cfg, model, joint, backbone, data
        self.name = "train-multi"
        self.names = [s.name for s in specs]
        tok = backbone.tokenizer
        self.weighting = make_weighting(cfg.weighting, self.names, device=backbone.device, **cfg.weighting_args)
        self.sampler = TaskSampler({n: len(data[n]["train"]) for n in self.names}, cfg.sampling, cfg.temperature, seed=cfg.seed)
        self.labels = {s.name: label_token_ids(tok, s) if s.type == "classification" else None for s in specs}
        self.cursors = {n: Cursor() for n in self.names}
        self.pending: list[list[tuple[int, int]]] = []  # the current step's micro-batches not yet read (none between steps)
        self.lengths = {n: [len(p) for p in data[n]["train"].prompts] for n in self.names}  # characters: enough to bucket by
        # Each split is tokenized once, up front; a step only picks rows of ids (the tokenizer stays out of the loop).
        self.prompt_ids = {n: data[n]["train"].prompt_ids(tok) for n in self.names}
        self.answers = {s.name: data[s.name]["train"].answers if self.labels[s.name] is not None else data[s.name]["train"].answer_ids(tok)
                        for s in specs}
        self.identity = joint_identity(specs, cfg, data, processes)
        # Tokens the model reads of each row after truncation (its loss plan's sequences): every process counts the global batch's.
        self.tokens = {s.name: [read_tokens(len(p), a, s.train.max_length, self.labels[s.name])
                                for p, a in zip(self.prompt_ids[s.name], self.answers[s.name])] for s in specs}
        self.latency: dict[str, float] = {}

    def param_groups(self) -> list[dict]:
        # Each task keeps its own learning rate and weight decay; the shared adapter takes their means, and the loss
        # weights the mean rate without decay (decay would pull learned log-variances toward 0, not toward a prior).
        mean_lr = sum(s.train.lr for s in self.specs) / len(self.specs)
        mean_decay = sum(s.train.weight_decay for s in self.specs) / len(self.specs)
        groups = [{"params": self.joint.parameters(s.name), "lr": s.train.lr, "weight_decay": s.train.weight_decay} for s in self.specs]
        if self.cfg.shared_adapter:
            groups.append({"params": self.joint.parameters(SHARED), "lr": mean_lr, "weight_decay": mean_decay})
        if self.weighting.parameters():
            groups.append({"params": self.weighting.parameters(), "lr": mean_lr, "weight_decay": 0.0})
        return groups

    def extra_params(self):
        return self.weighting.parameters()

    def idle_params(self) -> list[torch.nn.Parameter]:
        """The adapters of the tasks the step drew no row of (their zero gradients under DDP are dropped)."""
        return [p for i, name in enumerate(self.names) if i not in self.counts for p in self.joint.parameters(name)]

    def _draw_step(self, parallel: Parallel) -> None:
        """At a step's first micro-batch: its global rows (grad_accum × batch_size × processes (task, row) pairs, drawn at
        once, so accumulating 4 × 4 rows reads the rows of one batch of 16), cut into micro-batches, and each task's count
        over the whole step, which its loss is the mean over."""
        cfg = self.cfg
        draws = self.sampler.draw_batch(cfg.batch_size * parallel.world * cfg.grad_accum)
        pairs, self.counts, self.step_losses = [], {}, {}
        for i, s in enumerate(self.specs):
            k = draws.count(s.name)
            if k:
                rows = next_rows(self.cursors[s.name], self.lengths[s.name], k, cfg.seed + 1000 * i)
                pairs += [(i, r) for r in rows]
                self.counts[i] = loss_items([self.answers[s.name][r] for r in rows], s.train.max_length, self.labels[s.name])
        n = cfg.batch_size * parallel.world
        self.pending = [pairs[j : j + n] for j in range(0, len(pairs), n)]

    def step_loss(self, call, parallel: Parallel) -> StepLoss:
        cfg, tok = self.cfg, self.backbone.tokenizer
        first = not self.pending
        if first:
            self._draw_step(parallel)
        pairs = self.pending.pop(0)  # this micro-batch's global pairs
        mine = shard(pairs, parallel.rank, parallel.world)
        plans: dict[int, Plan] = {}  # task index → its rows' plan (this process's share)
        for i in self.counts:
            s = self.specs[i]
            rows = [r for t, r in mine if t == i]
            if rows:
                plans[i] = loss_plan_ids([self.prompt_ids[s.name][j] for j in rows], [self.answers[s.name][j] for j in rows],
                                         s.train.max_length, self.labels[s.name], tok.eos_token_id, reduction="sum")
        with autocast(self.backbone):  # bf16/fp16 activations; the fp32 adapter weights meet them in low-precision matmuls
            sums = joint_losses(self.model, tok.pad_token_id, self.joint, plans, call=call) if plans else {}
        zero = torch.zeros((), device=self.backbone.device)
        # Each task's part of its step loss: this share's sum over the step's count (the parts add up to the task's mean over
        # the step); × processes: DDP averages the gradients, and the mean over processes of these is the global batch's
        losses = {self.names[i]: sums.get(i, zero).float() * (parallel.world / self.counts[i]) for i in self.counts}
        used = self.weighting.weights()  # the weights this step's loss is combined with
        total = self.weighting.partial(losses, first)  # the parts add up to the rule's combination of the step's losses
        for n, v in losses.items():
            self.step_losses[n] = self.step_losses.get(n, 0) + v.detach()
        if not self.pending:  # the step's task losses (all-reduced: the global batch's) join a history-based rule's record
            observed = parallel.mean(torch.stack(list(self.step_losses.values())))
            self.weighting.record(dict(zip(self.step_losses, observed)))
        if parallel.world > 1:
            # A process whose share holds no row of some task leaves that task's adapter out of its
            # graph, and DDP would wait forever for its gradient: a zero term puts every adapter in.
            total = total + 0.0 * sum(p.sum() for name in self.joint.names() for p in self.joint.parameters(name))
        logs = {**{f"loss/{n}": v.detach() * cfg.grad_accum for n, v in losses.items()},  # fit() averages the micro-batches' logs
                **{f"weight/{n}": torch.tensor(w, device=zero.device) for n, w in used.items()},
                **{f"rows/{n}": torch.tensor(float(sum(self.names[t] == n for t, _ in pairs)), device=zero.device) for n in self.names}}
        # The step's combined loss is a mean already (each task's own mean over the step, weighted) and the micro-batches'
        # parts add up to it: each counts 1/grad_accum, so fit() sums them. The processes' average of a part is the global
        # value, so each gives its 1/world of it.
        return StepLoss(total / parallel.world, 1 / cfg.grad_accum, sum(self.tokens[self.names[t]][r] for t, r in pairs), logs)

    def scores(self, limit: int | None, parallel: Parallel) -> dict[str, dict]:
        """Each task's dev metrics through its own adapter (and the latency per example, kept for the sidecars); every
        process predicts its share of the rows (the same scores on every process)."""
        scores = {}
        for i, s in enumerate(self.specs):
            dev = self.data[s.name]["dev"]
            with self.joint.assign(i):
                metrics, _, seconds = evaluate_split(self.model, self.backbone.tokenizer, s, dev, limit=limit,
                                                     shard=(parallel.rank, parallel.world), gather=parallel.gather)
            scores[s.name] = {k: v for k, v in metrics.items() if k != "per_class"}
            rows = len(range(min(limit or len(dev), len(dev)))[parallel.rank :: parallel.world])  # this process's share
            if rows:  # a rank above 0 may hold none of a split shorter than the processes; rank 0, which writes it, holds one
                self.latency[s.name] = round(1000 * seconds / rows, 2)
        return scores

    def evaluate(self, limit, parallel):
        scores = self.scores(limit, parallel)
        mean = sum(scores[s.name][s.primary_metric] for s in self.specs) / len(self.specs)  # keep the best mean, not the last
        return mean, {**{f"dev/{n}/{k}": v for n, m in scores.items() for k, v in m.items()}, "dev/mean": round(mean, 4)}

    def observe(self, row: dict) -> None:
        for s in self.specs:
            self.sampler.observe(s.name, row[f"dev/{s.name}/{s.primary_metric}"])
        row.update({f"p/{n}": round(p, 4) for n, p in self.sampler.probabilities().items()})

    def state_dict(self):
        return {"sampler": self.sampler.state_dict(), "weighting": self.weighting.state_dict(),
                "cursors": {n: c.__dict__ for n, c in self.cursors.items()}}

    def load_state_dict(self, state):
        self.sampler.load_state_dict(state["sampler"])
        self.weighting.load_state_dict(state["weighting"])
        self.cursors = {n: Cursor(**c) for n, c in state["cursors"].items()}


def train_joint(specs: list[TaskSpec], output: str | Path, cfg: JointConfig | None = None, *, overwrite: bool = False,
                resume: bool = False, command: str | None = None, device: str | None = None, dtype: str | None = None,
                progress: bool = True) -> Path:
    """Train the tasks' adapters jointly; writes one adapter folder per task under `output`.

    A checkpoint is written every cfg.checkpoint_every steps (default: after every eval); `resume=True` continues an interrupted run exactly
    (weights, optimizer, schedule, RNG, task sampler, loss-weighting history, data cursors).
    Under torchrun / accelerate launch it trains data-parallel, as `train` does.
    """
    cfg = cfg or JointConfig.from_specs(specs)  # the shared keys the specs leave out are chosen below, as train chooses them
    check_specs(specs)
    output = Path(output)
    with claim_output(output, overwrite, resume) as work:  # held (rank 0) until the run folder is in place: a second run into it is refused
        data = {s.name: load_task_data(s) for s in specs}  # every task validated before anything is written
        for s in specs:
            check_labels_trained(s, data[s.name]["train"])
        backbone = load_backbone(specs[0].base, specs[0].quantization, local_device(device), dtype=dtype or specs[0].dtype)
        parallel = Parallel(backbone.device, specs[0].quantization)
        specs, cfg, choices = resolve_joint(specs, cfg, data, backbone.model, backbone.tokenizer, parallel.world)
        if parallel.main:
            print(f"resolved joint run ('#': chosen, as the specs left it out):\n{describe_joint(specs, cfg, choices)}", file=sys.stderr)
        for s in specs:  # max_length must fit each task's longest label or target (needs the tokenizer)
            check_lengths(s, backbone.tokenizer, data[s.name])
            for warning in data_warnings(s, backbone.tokenizer, data[s.name]) if parallel.main else ():  # as train says them
                print(f"{s.name}: {warning}", file=sys.stderr)
        seed_everything(cfg.seed)
        model = _attach(backbone.model, specs, cfg)
        joint = JointLora(model, [s.name for s in specs], cfg.shared_adapter, float(specs[0].method_args.get("lora_dropout", 0.0)))
        recipe = Joint(specs, cfg, model, joint, backbone, data, parallel.world)
        loop = LoopConfig.from_train(cfg)  # checkpoint_every None: at every eval
        if overwrite and not resume and parallel.main:  # start over, as train does: an interrupted run's checkpoint goes now,
            remove_work(work)  # else a later --resume would continue the run --overwrite was to discard
        result = fit(recipe, loop, parallel, work, resume=resume, progress=progress,
                     compute_dtype=backbone.dtype)  # fp16: the loss scaler, as for one adapter
        final = recipe.scores(None, parallel)  # every dev row, with the best weights (each process its share)
        if parallel.main:
            st = result.state
            state = {"device": str(backbone.device), "steps": st.step, "best_step": st.best_step, "stopped_by": result.stopped_by,
                     "train_seconds": round(st.train_seconds, 1), "tokens": st.tokens,
                     "train_tokens_per_s": round(st.tokens / max(st.train_seconds, 1e-9), 1), "peak_memory_mb": round(peak_memory_mb(str(backbone.device)), 1),
                     "latency_ms_per_example": recipe.latency, "processes": parallel.world,
                     "global_batch": cfg.batch_size * parallel.world * cfg.grad_accum}  # rows an optimizer step reads, as train records it
            _write_outputs(work, specs, cfg, backbone, data, model, joint, final, st.history, state, command, choices)
            publish_folder(work / "out", output)
            remove_work(work)
        parallel.barrier()
    return output


def joint_losses(model, pad_id: int, joint: JointLora, plans: dict[int, Plan], spread: float = 1.5, call=None) -> dict[int, torch.Tensor]:
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
        with joint.assign([owner[seq] for seq in bucket]):
            parts.append(logprobs_at(model, pad_id, [seqs[seq] for seq in bucket], [local[rows[j]] for j in picks], [cols[j] for j in picks], call))
        where += picks
    logp = torch.cat(parts)[torch.argsort(torch.tensor(where, device=device))]  # back to the plans' order
    return {task: plan.reduce(part) for (task, plan), part in zip(plans.items(), logp.split(counts))}


def _write_outputs(work: Path, specs, cfg: JointConfig, backbone, data, model, joint: JointLora, final: dict, history, state, command,
                   choices: dict[str, dict]) -> None:
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)  # a killed run's half-written folders (its --resume redoes only this end)
    out.mkdir()
    run = {"tasks": [s.name for s in specs], "config": cfg.to_dict(), "defaults": choices, "dev": final, "train_state": state,
           "base": {"name": specs[0].base, "hub_id": backbone.hub_id, "fingerprint": backbone.fingerprint},
           "trainable_parameters": trainable_parameters(model), "command": command or " ".join(sys.argv)}
    dropout, total = joint.dropout, run["trainable_parameters"]["total"]
    for i, s in enumerate(specs):
        folder, factors = out / s.name, joint.export(i)
        save_lora(folder, factors, backbone.hub_id, dropout)
        routing = routing_entry(model, backbone.tokenizer, s, folder)  # outside route(): the plain backbone's view
        own = [{"step": r["step"], "loss": r[f"loss/{s.name}"]} for r in history if f"loss/{s.name}" in r] + \
              [{"step": r["step"], **{k.split("/")[-1]: v for k, v in r.items() if k.startswith(f"dev/{s.name}/")}} for r in history if f"dev/{s.name}/{s.primary_metric}" in r]
        own_params = sum(a.numel() + b.numel() for a, b in factors.values())
        meta = adapter_meta(s, backbone, data[s.name], final[s.name], routing=routing, command=command,
                            trainable_parameters={"trainable": own_params, "total": total,
                                                  "percent": round(100.0 * own_params / total, 4)},
                            efficiency={"adapter_file_bytes": (folder / "adapter_model.safetensors").stat().st_size,
                                        "peak_memory_mb": state["peak_memory_mb"], "train_tokens_per_s": state["train_tokens_per_s"],
                                        "latency_ms_per_example": state["latency_ms_per_example"][s.name], "device": state["device"]},
                            train_state={k: state[k] for k in ("steps", "best_step", "stopped_by", "train_seconds", "tokens")},
                            joint={"run": "..", "tasks": run["tasks"], "shared_adapter": cfg.shared_adapter,
                                   "weighting": cfg.weighting, "sampling": cfg.sampling},
                            defaults={**choices["run"], **choices[s.name]})  # what `train` records: each key chosen, and why
        finish_folder(folder, meta, sorted(own, key=lambda r: r["step"]), s.primary_metric)
    if cfg.shared_adapter:
        save_lora(out / SHARED, joint.export(None), backbone.hub_id, dropout)
        # A component, not a task adapter: no task spec, no metrics; every task folder already holds it.
        build(SHARED, task=None, method="lora", base=base_record(specs[0].base, backbone), command=command,
              joint={"run": "..", "tasks": run["tasks"], "role": "shared"}).save(out / SHARED)
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
