"""Defaults a newcomer can trust: every setting a spec leaves out, chosen from what is known.

A spec may give only `name`, `type`, `data`, `prompt` and `label`/`labels` or `target`. Once the data
and the backbone are loaded, `resolve` fills each setting the spec did not give from the data (its
size and token lengths), the task type, the method (and its rank) and the model, and says why;
`train` prints the resolved spec and records the choices in the sidecar (`defaults`). A key the
spec gives is never changed. `train-multi` resolves by the same rules (`resolve_joint`): each task's own
keys as for that task alone, the run's shared keys over the tasks together.

The budget, when the spec gives neither `train.max_steps` nor `train.epochs`: up to EXAMPLE_BUDGET
rows (at most MAX_EPOCHS passes over a small split), an eval every 2.5% of that (25 steps at most),
and early stopping once the dev metric has gone PATIENCE evals without beating its last real gain by
more than one standard error of the periodic eval (smaller gains are noise), not before MIN_STEPS
(or a twentieth of a longer budget). Evals are not training time (train_seconds counts steps only) but they are wall time.
A spec that fixes max_steps trains that many steps: no early stopping unless it asks for patience.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

import torch

from adapterhub_lite.core.errors import DataError
from adapterhub_lite.core.spec import TaskSpec
from adapterhub_lite.model.adapter import default_method_args
from adapterhub_lite.model.heads import label_token_ids
from adapterhub_lite.training.joint_config import SHARED_TRAIN_KEYS, JointConfig

# Rows seen at most: the five shared tasks' tuned adapters peaked by 9,600 rows (sst2), most by 3,200.
EXAMPLE_BUDGET = 16_000
MAX_EPOCHS = 20  # a few hundred rows still need many passes; this bounds them
PATIENCE = 2  # evals without a real gain (every 25 steps: 800 rows at batch 16)
EVALS_PER_BUDGET = 40
MIN_STEPS = 50  # early stopping waits for this many steps (800 rows at batch 16), or a twentieth of a longer budget
MAX_AUTO_LENGTH = 1024  # a longer outlier row would set every batch's memory; longer rows are truncated (prompt side)
# Learning rates by method. LoRA's scale is alpha / r = 2; Adam moves each of the r components about
# lr per step, so the update B·A grows like sqrt(r): lr ∝ 1/sqrt(r) keeps it the same (1e-3 at r = 8,
# ~3.5e-4 at r = 64, near QLoRA's 2e-4). Soft prompts and IA3 vectors need larger steps (peft's and
# the IA3 paper's recipes).
LORA_LR_AT_R8 = 1e-3
LR = {"prefix": 1e-2, "prompt": 3e-2, "ia3": 3e-3}
# The batch those rates were tuned at (rows a step; the CPU default). A batch given in tokens scales the rate by
# sqrt(rows a step / REFERENCE_BATCH), Adam's square-root rule (Malladi et al., 2022), at most LR_SCALE_MAX times.
REFERENCE_BATCH = 16
LR_SCALE_MAX = 4.0
# On a GPU a step of 16 short rows (~270 tokens for SST-2) leaves it waiting on the host: the default batch is in
# tokens, GPU_BATCH_TOKENS, or what half the free memory holds of the activations a training token keeps
# (layers × hidden × ACTIVATION_BYTES, Korthikanti et al.'s 34 bytes per layer and hidden unit in 16-bit).
GPU_BATCH_TOKENS = 16_384
ACTIVATION_BYTES = 34


@dataclass
class Resolved:
    """A spec with every setting decided, and why each left-out one got its value."""

    spec: TaskSpec
    choices: dict[str, dict] = field(default_factory=dict)  # dotted key → {"value": …, "why": "…"}

    def describe(self) -> str:
        """The resolved spec as YAML (valid, reusable), each chosen key commented with its reason."""
        lines = []
        for key, value in self.spec.to_dict().items():
            if isinstance(value, dict) and value and key in ("data", "train", "method_args"):
                lines.append(f"{key}:")
                lines += [self._line(f"  {k}", v, self.choices.get(f"{key}.{k}")) for k, v in value.items()]
            else:
                lines.append(self._line(key, value, self.choices.get(key)))
        return "\n".join(lines)

    @staticmethod
    def _line(key: str, value, choice: dict | None) -> str:
        text = f"{key}: {json.dumps(value, ensure_ascii=False)}"  # JSON values are YAML
        return f"{text}  # {choice['why']}" if choice else text


def lora_lr(r: int) -> float:
    """The learning rate for a LoRA of rank r (see LORA_LR_AT_R8)."""
    return float(f"{LORA_LR_AT_R8 * math.sqrt(8 / r):.2g}")


def device_memory(model) -> tuple[str, int | None]:
    """(device type, free bytes) where the model lives; free bytes only on CUDA."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return device.type, None
    return "cuda", torch.cuda.mem_get_info(device)[0]


def default_batch_tokens(model, device_type: str, free_bytes: int | None) -> tuple[int, str] | None:
    """The batch in tokens a GPU run takes when the spec gives neither batch_size nor batch_tokens, and why; None on
    a CPU (its default, batch_size rows, stays as measured)."""
    if device_type != "cuda" or not free_bytes:
        return None
    config = model.config.get_text_config(decoder=True)
    per_token = config.num_hidden_layers * config.hidden_size * ACTIVATION_BYTES
    fits = int(0.5 * free_bytes / per_token)
    tokens = max(1024, min(GPU_BATCH_TOKENS, fits) // 1024 * 1024)
    why = (f"a GPU step of {tokens:,} tokens (at most {GPU_BATCH_TOKENS:,}; half the {free_bytes / 2**30:.0f} GiB free holds "
           f"{fits:,} tokens of activations)")
    return tokens, why


def default_warmup(steps: int) -> tuple[int, str]:
    """The warm-up a run of `steps` steps gets when its spec leaves warmup_steps out, and why (train and train-multi)."""
    if steps == 1:  # warm-up's first step runs at lr 0: a 1-step run would leave the adapter as it started
        return 0, "none: the only step would run at learning rate 0"
    return min(100, max(1, steps // 20)), f"5% of {steps} steps" + (", at most 100" if steps // 20 > 100 else "")


def resolve(spec: TaskSpec, data: dict, model, tokenizer, processes: int = 1) -> Resolved:
    """Fill every setting `spec` left out (spec.given lists what it set), from the data, task, method and model.

    `data` holds the loaded splits (train and dev), `model` the plain backbone (before the adapter),
    `processes` the data-parallel world size (a step reads batch_size rows on each).
    """
    given = spec.given
    choices: dict[str, dict] = {}

    def choose(key: str, value, why: str):
        choices[key] = {"value": value, "why": why}
        return value

    method_args = dict(spec.method_args)
    for key, value in default_method_args(spec.method, model).items():
        if key not in method_args:
            why = "every linear layer but the output head" if key == "target_modules" else f"{spec.method} default"
            method_args[key] = choose(f"method_args.{key}", value, why)

    t = dataclasses.asdict(spec.train)
    if "train.lr" not in given:
        if spec.method == "lora":
            t["lr"] = choose("train.lr", lora_lr(method_args["r"]), f"suits LoRA rank {method_args['r']} (1e-3 × sqrt(8 / r))")
        else:
            t["lr"] = choose("train.lr", LR[spec.method], f"{spec.method} learns with larger steps than LoRA")

    prompts = data["train"].prompt_ids(tokenizer)
    rows = len(data["train"])
    _batch_in_tokens(spec, data, model, tokenizer, prompts, processes, t, choose)
    if "train.batch_size" not in given and t["batch_size"] * processes * t["grad_accum"] > rows:  # a small split: a step holds it once
        t["batch_size"] = choose("train.batch_size", max(1, rows // (processes * t["grad_accum"])),
                                 f"the {rows} train rows in a step (the default {t['batch_size']} rows would read rows twice a step)")
    per_step = t["batch_size"] * t["grad_accum"] * processes
    steps_per_epoch = math.ceil(rows / per_step)
    if t["epochs"] and "train.epochs" in given:  # load_spec refuses a written spec that also sets max_steps
        auto_stop = True
        t["max_steps"] = choose("train.max_steps", max(1, math.ceil(t["epochs"] * steps_per_epoch)),
                                f"{t['epochs']} epochs × {steps_per_epoch} steps of {per_step} rows")
    elif "train.max_steps" in given:
        auto_stop = False  # the spec fixed the steps: train them all unless it asks for patience
    else:
        auto_stop = True
        epochs = round(min(MAX_EPOCHS, EXAMPLE_BUDGET / rows), 2)
        t["epochs"] = choose("train.epochs", epochs, f"up to {EXAMPLE_BUDGET:,} rows, at most {MAX_EPOCHS} passes over the {rows:,} train rows")
        t["max_steps"] = choose("train.max_steps", max(1, math.ceil(_row_budget(rows) / per_step)),
                                f"{epochs} epochs at {per_step} rows a step; early stopping usually ends it sooner")
    dev_rows = len(data["dev"])
    eval_rows = min(dev_rows, _eval_rows_cap([spec]))
    _evals_and_stopping(t, given, choose, auto_stop, eval_rows, f"{eval_rows} of {dev_rows} dev rows")

    limit = min(MAX_AUTO_LENGTH, getattr(model.config, "max_position_embeddings", MAX_AUTO_LENGTH) or MAX_AUTO_LENGTH)
    if spec.type == "generation":
        answers = data["train"].answer_ids(tokenizer)
        longest_answer = max((len(a) for a in answers), default=1)
        if "train.max_new_tokens" not in given:
            t["max_new_tokens"] = choose("train.max_new_tokens", math.ceil(1.25 * longest_answer) + 1,
                                         f"the longest train target ({longest_answer} tokens) + 25% + EOS")
        # Decoding keeps the last max_length - max_new_tokens prompt tokens: room for the longest prompt
        # and the whole decoding budget (which holds the longest target + EOS), so no prompt is cut.
        longest = max((len(p) for p in prompts), default=1) + t["max_new_tokens"]
    else:
        longest = max((len(p) for p in prompts), default=1) + max(len(ids) for ids in label_token_ids(tokenizer, spec))
    if "train.max_length" not in given:
        what = "prompt + max_new_tokens" if spec.type == "generation" else "prompt + label word"
        why = f"the longest train {what}: {longest} tokens" + (f", capped at {limit}" if longest > limit else "")
        t["max_length"] = choose("train.max_length", min(longest, limit), why)

    return Resolved(dataclasses.replace(spec, method_args=method_args, train=type(spec.train)(**t)), choices)


# What a joint run's task keeps of its own resolve: the keys of its optimizer group and its rows (the rest is the run's).
TASK_OWN_KEYS = ("train.lr", "train.max_length", "train.max_new_tokens")


def resolve_joint(specs: list[TaskSpec], cfg: JointConfig, data: dict, model, tokenizer,
                  processes: int = 1) -> tuple[list[TaskSpec], JointConfig, dict[str, dict]]:
    """train-multi's `resolve`: the same defaults from the same rules, so a key left out means one thing in both recipes.

    Each task's own keys (its LoRA targets, lr, max_length, max_new_tokens) are what `train` would choose for it alone
    (its batch is the run's mixed rows, not chosen per task). The run's shared keys that no spec gives (cfg.given; None:
    all given) follow `train`'s rules over the tasks together: the budget is the sum of the rows each task gets alone,
    the evals, warm-up and early stopping as _evals_and_stopping sets them. `data`: task name → its splits. Returns the
    tasks' specs as trained (the run's shared keys written in, so each sidecar records what ran), the resolved cfg, and
    the choices: "run" → the shared keys chosen, task name → its own chosen keys.
    """
    given = frozenset(f"train.{k}" for k in (SHARED_TRAIN_KEYS if cfg.given is None else cfg.given))
    choices: dict[str, dict] = {"run": {}}

    def choose(key: str, value, why: str):
        choices["run"][key] = {"value": value, "why": why}
        return value

    t = {k: getattr(cfg, k) for k in SHARED_TRAIN_KEYS}
    rows = {s.name: len(data[s.name]["train"]) for s in specs}
    total = sum(rows.values())
    if "train.batch_size" not in given and t["batch_size"] * processes * t["grad_accum"] > total:  # as train's small split
        t["batch_size"] = choose("train.batch_size", max(1, total // (processes * t["grad_accum"])),
                                 f"the tasks' {total} train rows in a step (the default {t['batch_size']} rows would read rows twice a step)")
    check_step_rows(t["batch_size"], t["grad_accum"], processes, total,
                    f"the tasks have {total} training rows together ({', '.join(f'{n}: {r}' for n, r in rows.items())})")
    auto_stop = "train.max_steps" not in given
    if auto_stop:
        per_step = t["batch_size"] * t["grad_accum"] * processes
        budget = sum(_row_budget(r) for r in rows.values())
        t["max_steps"] = choose("train.max_steps", max(1, math.ceil(budget / per_step)),
                                f"the rows each task gets alone (up to {EXAMPLE_BUDGET:,}, at most {MAX_EPOCHS} passes), {budget:,} in all, "
                                f"at {per_step} rows a step; early stopping usually ends it sooner")
    eval_rows = min(_eval_rows_cap(specs), max(len(data[s.name]["dev"]) for s in specs))
    _evals_and_stopping(t, given, choose, auto_stop, eval_rows, f"up to {eval_rows} dev rows of each task")
    if t["checkpoint_every"] is None:  # a JointConfig built by hand: at every eval
        t["checkpoint_every"] = t["eval_every"]
    cfg = dataclasses.replace(cfg, **t)
    resolved = []
    for s in specs:  # batch_size counts as given: the run's mixed batch is no task's to choose
        own = resolve(dataclasses.replace(s, given=s.given | {"train.batch_size"}), data[s.name], model, tokenizer, processes)
        kept = {k: v for k, v in own.choices.items() if k in TASK_OWN_KEYS or k.startswith("method_args.")}
        choices[s.name] = kept
        own_keys = {k.split(".")[1]: getattr(own.spec.train, k.split(".")[1]) for k in TASK_OWN_KEYS}
        train = dataclasses.replace(s.train, **own_keys, **t)
        resolved.append(dataclasses.replace(s, method_args=own.spec.method_args, train=train))
    return resolved, cfg, choices


def check_step_rows(batch_size: int, grad_accum: int, processes: int, rows: int, held: str) -> None:
    """Refuse a step that reads more rows than there are (`held`: where they are, e.g. "'train.jsonl' has 96 training
    rows"), for train and train-multi alike: the sampler would repeat rows within every step, unsaid."""
    per_step = batch_size * processes * grad_accum
    if per_step > rows:  # accumulated micro-batches are one batch: grad_accum counts too
        accum = f" × train.grad_accum={grad_accum}" if grad_accum > 1 else ""
        fix = "train.batch_size × train.grad_accum" if grad_accum > 1 else "train.batch_size"
        raise DataError(f"train.batch_size={batch_size} × {processes} process(es){accum} = {per_step} rows a step, but "
                        f"{held}; use {fix} ≤ {rows // processes}")


def describe_joint(specs: list[TaskSpec], cfg: JointConfig, choices: dict[str, dict]) -> str:
    """A resolved joint run as train-multi prints it: the run's shared keys, then each task's own chosen keys, each
    chosen key commented with its reason (Resolved.describe's lines)."""
    lines = ["train:"] + [Resolved._line(f"  {k}", getattr(cfg, k), choices["run"].get(f"train.{k}")) for k in SHARED_TRAIN_KEYS]
    for s in specs:
        own = choices.get(s.name, {})
        lines.append(f"{s.name}:" + ("" if own else " {}  # every key as its spec gives it"))
        lines += [Resolved._line(f"  {k}", c["value"], c) for k, c in own.items()]
    return "\n".join(lines)


def _row_budget(train_rows: int) -> int:
    """The rows a task's training reads when its spec fixes no budget: up to EXAMPLE_BUDGET, at most MAX_EPOCHS passes."""
    return min(MAX_EPOCHS * train_rows, EXAMPLE_BUDGET)


def _eval_rows_cap(specs: list[TaskSpec]) -> int:
    """The dev rows a periodic eval scores at most (the final eval scores all): fewer when a task generates, as its
    eval decodes token by token."""
    return 300 if all(s.type == "classification" for s in specs) else 100


def _evals_and_stopping(t: dict, given: frozenset, choose, auto_stop: bool, eval_rows: int, scored: str) -> None:
    """The settings that follow from the budget t["max_steps"], for train and train-multi alike: eval_every,
    checkpoint_every, warmup_steps, eval_samples (`eval_rows`; `scored` says which rows) and, when the budget was not
    fixed by max_steps (`auto_stop`), early stopping's patience, min_delta and min_steps. Fills what `given` lacks."""
    steps = t["max_steps"]
    if "train.eval_every" not in given:
        t["eval_every"] = choose("train.eval_every", max(10, min(25, steps // EVALS_PER_BUDGET)) if steps >= 10 else steps,
                                 f"~{EVALS_PER_BUDGET} evals over {steps} steps (10 to 25 steps apart)")
    if "train.checkpoint_every" not in given:
        t["checkpoint_every"] = choose("train.checkpoint_every", t["eval_every"], "at every eval")
    if "train.warmup_steps" not in given:
        t["warmup_steps"] = choose("train.warmup_steps", *default_warmup(steps))
    if "train.eval_samples" not in given:
        t["eval_samples"] = choose("train.eval_samples", eval_rows, f"periodic evals score {scored} (the final eval, all)")
    if auto_stop:
        if "train.patience" not in given:
            t["patience"] = choose("train.patience", PATIENCE, f"stop after {PATIENCE} evals without a real gain")
        if "train.min_delta" not in given:
            se = round(0.4 / math.sqrt(max(1, t["eval_samples"])), 4)
            t["min_delta"] = choose("train.min_delta", se, f"a smaller gain is noise: one standard error of an accuracy near 0.8 on {t['eval_samples']} rows")
        if "train.min_steps" not in given:
            t["min_steps"] = choose("train.min_steps", min(steps, max(MIN_STEPS, steps // 20)),
                                    "before stopping early: a metric can sit still while the loss falls")


def _batch_in_tokens(spec: TaskSpec, data: dict, model, tokenizer, prompts: list, processes: int, t: dict, choose) -> None:
    """batch_size from train.batch_tokens (given, or on a GPU chosen by default_batch_tokens when the spec gives
    neither): the tokens an optimizer step should read ÷ the train rows' mean tokens (prompt + target or longest label
    word, each at most MAX_AUTO_LENGTH), shared by its grad_accum micro-batches and its processes; a learning rate left out is scaled by Adam's square-root rule. A
    batch_size the spec gives is never changed."""
    given = spec.given
    if "train.batch_size" in given:
        return
    if "train.batch_tokens" in given and t["batch_tokens"]:
        tokens, why = t["batch_tokens"], "train.batch_tokens"
    else:
        chosen = default_batch_tokens(model, *device_memory(model))
        if chosen is None:
            return
        tokens, why = chosen
        t["batch_tokens"] = choose("train.batch_tokens", tokens, why)
    if spec.type == "generation":
        extra = [len(a) + 1 for a in data["train"].answer_ids(tokenizer)]  # target + EOS
    else:
        extra = [max(len(w) for w in label_token_ids(tokenizer, spec))] * len(prompts)
    mean = sum(min(len(p) + e, MAX_AUTO_LENGTH) for p, e in zip(prompts, extra)) / max(1, len(prompts))
    # The tokens are the optimizer step's: its micro-batches (grad_accum) and processes share them, so
    # batch_size × processes × grad_accum rows a step; at most the split (train refuses a step reading a row twice)
    accum = t["grad_accum"]
    rows = max(1, min(round(tokens / mean / processes / accum), len(prompts) // (processes * accum)))
    t["batch_size"] = choose("train.batch_size", rows, f"{tokens:,} tokens a step ({why})"
                             + (f" ÷ {accum} micro-batches" if accum > 1 else "") + f" ÷ {mean:.0f} tokens a row"
                             + (f" ÷ {processes} processes" if processes > 1 else ""))
    if "train.lr" not in given:
        scale = min(LR_SCALE_MAX, math.sqrt(rows * processes * t["grad_accum"] / REFERENCE_BATCH))
        lr = float(f"{t['lr'] * scale:.2g}")
        t["lr"] = choose("train.lr", lr, f"{t['lr']:.2g} at {REFERENCE_BATCH} rows × sqrt({rows * processes * t['grad_accum']} / {REFERENCE_BATCH}) "
                         f"(Adam's square-root rule, at most ×{LR_SCALE_MAX:g})")
