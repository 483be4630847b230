"""The one training loop every recipe runs (nanoGPT's shape: one readable loop, comments say why).

    for each step: micro-batches → loss → backward (DDP averages the adapter's gradients)
                   clip → optimizer → schedule
                   every log_every steps: one metrics row (window means)
                   every eval_every steps: evaluate on rank 0, share the result, keep the best, maybe stop
                   every checkpoint_every steps (default: eval_every) and when the run stops: checkpoint
    until max_steps, early stopping (patience), or the time budget.

What differs between recipes (one adapter or per-row adapters, loss weighting, task sampling) is
the `Recipe` passed in.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from adapterhub_lite.artifacts.folder import nonfinite_tensors, write_jsonl
from adapterhub_lite.training.checkpoint import Checkpoint
from adapterhub_lite.training.parallel import Parallel
from adapterhub_lite.training.progress import RunState, TrainingError, check_resume


@dataclass
class LoopConfig:
    """The loop's settings: what fit() needs of a run's settings (from_train reads them off a TrainConfig)."""

    max_steps: int
    eval_every: int
    warmup_steps: int = 0
    schedule: str = "linear"
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    eval_samples: int | None = None
    checkpoint_every: int | None = None  # None: every eval_every steps
    log_every: int = 10
    max_minutes: float = 0.0
    patience: int = 0  # evals without improvement before stopping (0: never)
    min_delta: float = 0.0  # an improvement is a score above the best by more than this (smaller gains are eval noise)
    min_steps: int = 0  # early stopping waits until this step (a generation metric can sit at 0 while the loss falls)

    @classmethod
    def from_train(cls, train, **overrides) -> LoopConfig:
        """The loop's settings read off a run's settings (a spec's `train` section, core.spec.TrainConfig, or a
        JointConfig), field by field: the loop has no defaults of its own for what a run sets. `overrides`: what a
        recipe decides itself (a joint run checkpoints at every eval)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: getattr(train, k) for k in fields if hasattr(train, k)}, **overrides})


@dataclass
class StepLoss:
    """One micro-batch's result on this process."""

    loss: torch.Tensor  # what to backward: this process's share, scaled so that DDP's average is the global batch's mean
    tokens: int  # tokens the global micro-batch read (every process knows the global rows: no collective)
    logs: dict[str, torch.Tensor] = field(default_factory=dict)  # per-step values (local shares; averaged over processes)


class Recipe:
    """What a recipe gives the loop. Subclasses set `name`, `model`, `identity` and implement the methods."""

    name: str
    model: torch.nn.Module  # holds the trainable parameters; wrapped for DDP
    identity: dict  # run identity (spec and data hashes), checked on resume

    def param_groups(self) -> list[dict]:
        """Optimizer parameter groups (each with its lr)."""
        raise NotImplementedError

    def extra_params(self) -> list[torch.nn.Parameter]:
        """Trainable parameters outside `model` (e.g. learned loss weights, also in param_groups): the loop averages their gradients."""
        return []

    def step_loss(self, call, parallel: Parallel) -> StepLoss:
        """Draw the next global micro-batch, take this process's share, return its loss. `call` runs the model (DDP)."""
        raise NotImplementedError

    def evaluate(self, limit: int | None) -> tuple[float, dict]:
        """(score to maximize, metrics row) on the dev data; runs on rank 0 only."""
        raise NotImplementedError

    def observe(self, row: dict) -> None:
        """Every process sees the eval row (rank 0's), e.g. to adapt task sampling."""

    def trainable(self) -> dict[str, torch.Tensor]:
        """The trained tensors by name (what is checkpointed, kept as best, checked for NaN)."""
        raise NotImplementedError

    def load_trainable(self, values: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Recipe progress a resume needs (data cursors, sampler, loss weights)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class LoopResult:
    state: RunState
    stopped_by: str  # max_steps | early_stopping | max_minutes


def fit(recipe: Recipe, cfg: LoopConfig, parallel: Parallel, work, *, resume: bool = False, progress: bool = True,
        fused: bool = False, scaler: torch.amp.GradScaler | None = None) -> LoopResult:
    """Train `recipe` for cfg.max_steps (or until it stops early); the best evaluated weights are loaded at the end."""
    groups = recipe.param_groups()
    extra = recipe.extra_params()
    params = [p for g in groups for p in g["params"]]
    for p in params:  # peft keeps adapters fp32 on a low-precision base (autocast_adapter_dtype); make sure of it
        if p.dtype != torch.float32:
            p.data = p.data.float()
    # fused AdamW: one kernel for every parameter instead of a few per tensor on the GPU
    opt = torch.optim.AdamW(groups, weight_decay=groups[0].get("weight_decay", 0.0), fused=fused)
    sched = get_scheduler(cfg.schedule, opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps)
    call, opt, sched = parallel.prepare(recipe.model, opt, sched)
    raw_opt = getattr(opt, "optimizer", opt)  # the loss scaler keys its state by the torch optimizer
    scaler = scaler or torch.amp.GradScaler(enabled=False)
    device = next(recipe.model.parameters()).device
    ckpt = Checkpoint(work, parallel)
    state, best = RunState(), None
    if resume:
        saved = ckpt.load()
        check_resume(saved.get("run"), recipe.identity, work)
        recipe.load_trainable(saved["adapter"])
        recipe.load_state_dict(saved["recipe"])
        state, best = RunState(**saved["state"]), saved["best"]
        if saved.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(saved["scaler"])
        if parallel.main:
            print(f"resuming from step {state.step}", file=sys.stderr)
    if parallel.main:
        work.mkdir(parents=True, exist_ok=True)
        write_jsonl(work / "metrics.jsonl", state.history)

    def record(row: dict) -> None:
        state.history.append(row)
        if parallel.main:
            with open(work / "metrics.jsonl", "a") as fh:  # append-only log for `tail -f`; rewritten on resume
                fh.write(json.dumps(row) + "\n")

    def checkpoint() -> None:
        trained = recipe.trainable()
        if nonfinite_tensors(trained):  # a diverged adapter never replaces a good checkpoint
            raise TrainingError(f"training stopped: the adapter's weights became non-finite by step {state.step}; nothing was saved past "
                                f"the last good checkpoint {_where(ckpt)}; lower train.lr and train again without --resume")
        ckpt.save({"adapter": {k: v.detach().cpu() for k, v in trained.items()}, "best": best, "state": state.__dict__,
                   "recipe": recipe.state_dict(), "run": recipe.identity,
                   "scaler": scaler.state_dict() if scaler.is_enabled() else None})

    # Logged values stay on the device and are summed there; reading them (a host sync that drains
    # the GPU queue) happens once per metrics row. A row holds the means over the steps since the
    # previous row; the window always ends at a checkpoint, so a resumed run writes exactly the rows
    # of an uninterrupted one. The first step whose loss was not finite is tracked on the device
    # too (0: none). Under fp16 the loss scaler skips such steps and recovers, so there only a
    # non-finite adapter (checked at each checkpoint) stops the run.
    window: dict[str, torch.Tensor] = {}
    window_steps = 0
    first_bad = torch.zeros((), dtype=torch.long, device=device)
    stop_on_bad_loss = not scaler.is_enabled()
    checkpoint_every = cfg.checkpoint_every or cfg.eval_every
    start_wall = time.monotonic() - state.train_seconds
    bar = tqdm(total=cfg.max_steps, initial=state.step, disable=not (progress and parallel.main), desc=recipe.name, dynamic_ncols=True)
    stopped_by = "max_steps"
    while state.step < cfg.max_steps:
        recipe.model.train()
        t0, tokens = time.perf_counter(), 0
        step_logs: dict[str, torch.Tensor] = {}
        for _ in range(cfg.grad_accum):
            part = recipe.step_loss(call, parallel)
            scaler.scale(part.loss / cfg.grad_accum).backward()  # scaled so accumulated grads average, not sum
            tokens += part.tokens
            for k, v in part.logs.items():
                step_logs[k] = step_logs.get(k, 0) + v.detach().float() / cfg.grad_accum
        for p in extra:  # parameters DDP does not hold: average their gradients here
            if p.grad is not None:
                p.grad = parallel.mean(p.grad)
        # The global batch's logged values: one collective for all of them (none when alone).
        keys = sorted(step_logs)
        values = parallel.mean(torch.stack([step_logs[k] for k in keys])) if parallel.world > 1 else [step_logs[k] for k in keys]
        for k, v in zip(keys, values):
            window[k] = window.get(k, 0) + v
        if "loss" in step_logs:
            first_bad = torch.where((first_bad == 0) & ~torch.isfinite(values[keys.index("loss")]), state.step + 1, first_bad)
        scaler.unscale_(raw_opt)  # clip the true gradients (no-op unless fp16)
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        scaler.step(raw_opt)
        scaler.update()
        sched.step()
        opt.zero_grad(set_to_none=True)
        state.step += 1
        state.tokens += tokens
        window_steps += 1
        bar.update(1)

        last = state.step == cfg.max_steps
        out_of_time = cfg.max_minutes > 0 and parallel.agree(time.monotonic() - start_wall > cfg.max_minutes * 60)  # one scalar all-reduce
        evaluating = state.step % cfg.eval_every == 0 or last or out_of_time
        checkpointing = state.step % checkpoint_every == 0 or evaluating
        logged = state.step % cfg.log_every == 0 or checkpointing
        if logged:
            means = torch.stack([window[k] / window_steps for k in keys] + [first_bad.float()]).tolist()  # the one host sync
            values, bad_step = dict(zip(keys, means[:-1])), int(means[-1])
            window, window_steps = {}, 0
            if bad_step and stop_on_bad_loss:
                raise TrainingError(f"training stopped: the loss became non-finite at step {bad_step} (window mean {values.get('loss')}); "
                                    f"nothing was saved past the last good checkpoint {_where(ckpt)}; lower train.lr "
                                    "(or raise train.warmup_steps) and train again without --resume")
        state.train_seconds += time.perf_counter() - t0  # after the sync, so queued GPU work is counted
        if logged:
            tps = state.tokens / max(state.train_seconds, 1e-9)
            row = {"step": state.step, **{k: (round(v, 5) if math.isfinite(v) else None) for k, v in values.items()},
                   "lr": sched.get_last_lr()[0], "tokens_per_s": round(tps, 1)}  # JSON has no inf/NaN (an fp16 overflow)
            record(row)
            bar.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}", tok_s=f"{tps:.0f}")

        if evaluating:
            score, row = recipe.evaluate(cfg.eval_samples) if parallel.main else (None, None)
            score, row = parallel.share((score, row))  # every process takes the same decisions
            recipe.observe(row)
            record({"step": state.step, **row})
            # Two bests: the weights kept are the best seen (any gain); patience counts evals that did not
            # beat the score of the last *real* improvement by more than min_delta (Keras' EarlyStopping).
            improved = state.best_metric is None or score > state.best_metric
            if state.plateau_score is None or score > state.plateau_score + cfg.min_delta:
                state.plateau_score, state.bad_evals = score, 0
            else:
                state.bad_evals += 1
            if improved:
                state.best_metric, state.best_step = score, state.step
                best = {k: v.detach().cpu().clone() for k, v in recipe.trainable().items()}  # keep the best, not the last
            if parallel.main:
                bar.write(f"step {state.step}: dev {score:.4f} (best {state.best_metric:.4f} @ {state.best_step})", file=sys.stderr)
            if cfg.patience and state.bad_evals >= cfg.patience and state.step >= cfg.min_steps:
                stopped_by = "early_stopping"
        if out_of_time and stopped_by == "max_steps":
            stopped_by = "max_minutes"
        if state.step % checkpoint_every == 0 or stopped_by != "max_steps":
            checkpoint()
        if stopped_by != "max_steps":
            break
    bar.close()
    if best is not None:
        recipe.load_trainable(copy.deepcopy(best))
    if nonfinite_tensors(recipe.trainable()):
        raise TrainingError(f"training stopped: the adapter's weights became non-finite by step {state.step}; nothing was saved past "
                            f"the last good checkpoint {_where(ckpt)}; lower train.lr and train again without --resume")
    return LoopResult(state, stopped_by)


def _where(ckpt: Checkpoint) -> str:
    folder = ckpt.find()
    return f"(in {folder})" if folder else "(none was written yet)"
