"""The one training loop every recipe runs (nanoGPT's shape: one readable loop, comments say why).

    for each step: micro-batches → summed loss → backward (DDP averages the adapter's gradients once, at the last)
                   gradients ÷ the step's count of target tokens or rows (the loss contract: StepLoss)
                   clip → optimizer → schedule
                   every log_every steps: one metrics row (window means, the last step's pre-clip grad_norm)
                   every eval_every steps: evaluate (each process its share), keep the best, maybe stop
                   every checkpoint_every steps (default: eval_every) and when the run stops early: checkpoint
    until max_steps, early stopping (patience), or the time budget.

`fit` is that loop, each step a named method of `_Run` (which holds what the steps share).

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
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from adapterhub_lite.artifacts.files import write_jsonl
from adapterhub_lite.artifacts.folder import nonfinite_tensors
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
    seed: int = 0  # the run's; under several processes each one above rank 0 draws dropout from seed + rank (Parallel.seed_ranks)

    @classmethod
    def from_train(cls, train, **overrides) -> LoopConfig:
        """The loop's settings read off a run's settings (a spec's `train` section, core.spec.TrainConfig, or a
        JointConfig), field by field: the loop has no defaults of its own for what a run sets. `overrides`: what a
        recipe decides itself, over the run's settings (no recipe passes any now)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: getattr(train, k) for k in fields if hasattr(train, k)}, **overrides})


@dataclass
class StepLoss:
    """One micro-batch's result on this process: the loss contract between a recipe and fit().

    A recipe sums its loss over what it read and says what the sum counts; fit() divides by the
    optimizer step's total count, over every micro-batch and process (torchtune's rule). So a
    generation task's step loss is the mean over all its target tokens, whatever the micro-batches
    held, and grad_accum 4 × batch 4 trains the same adapter as batch 16.
    """

    loss: torch.Tensor  # summed over this process's share: the processes' values add up to the global micro-batch's sum
    count: float  # what that sum counts (target tokens, rows; 1 / grad_accum for a part of a step whose loss is a mean already, as joint's), the same on every process
    tokens: int  # tokens the global micro-batch read (every process knows the global rows: no collective)
    logs: dict[str, torch.Tensor] = field(default_factory=dict)  # other per-step values (means; averaged over micro-batches and processes)


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

    def idle_params(self) -> list[torch.nn.Parameter]:
        """Trainable parameters that no row of the step just taken reached (a task the step drew no row of). Alone they get
        no gradient and AdamW leaves them be; under DDP every parameter must be in every process's graph, so they got a zero
        one, and AdamW would move them by momentum and weight decay: the loop drops those gradients (as DDP itself does for a
        parameter no process used), so N processes train what one does."""
        return []

    def evaluate(self, limit: int | None, parallel: Parallel) -> tuple[float, dict]:
        """(score to maximize, metrics row) on the dev data. Runs on every process: each predicts its share of the
        rows and the predictions are gathered (evaluate_split's shard/gather), so all return the same values."""
        raise NotImplementedError

    def observe(self, row: dict) -> None:
        """Every process sees the eval row (rank 0's), e.g. to adapt task sampling."""

    def trainable(self) -> dict[str, torch.Tensor]:
        """The trained tensors by name (what is checkpointed, kept as best, checked for NaN): the parameters being
        trained themselves. Not get_peft_model_state_dict, which is what a folder saves: for a prefix with
        prefix_projection that is the projected prefix, from which the embedding and MLP being trained cannot be set."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def load_trainable(self, values: dict[str, torch.Tensor]) -> None:
        """Set the trained tensors to `values` (a checkpoint's, or the best kept); refuse a set of other names."""
        params = self.trainable()
        if set(values) != set(params):
            raise TrainingError("the checkpoint holds other tensors than this adapter trains (written by an older version); "
                                "run with --overwrite instead of --resume to start fresh")
        with torch.no_grad():
            for n, value in values.items():
                params[n].copy_(value)

    def state_dict(self) -> dict:
        """Recipe progress a resume needs (data cursors, sampler, loss weights)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class LoopResult:
    """What fit() returns: the run's final state and why it stopped."""

    state: RunState
    stopped_by: str  # max_steps | early_stopping | max_minutes


def _still_out_of_time(state: RunState, cfg: LoopConfig) -> bool:
    """Whether a resumed run that its time budget ended is still out of time: its budget now (0: none) is no larger."""
    return 0 < cfg.max_minutes <= state.out_of_time


def fit(recipe: Recipe, cfg: LoopConfig, parallel: Parallel, work, *, resume: bool = False, progress: bool = True,
        compute_dtype: torch.dtype = torch.float32) -> LoopResult:
    """Train `recipe` for cfg.max_steps (or until it stops early); the best evaluated weights are loaded at the end.

    `compute_dtype`: the backbone's; under fp16 every recipe's loss is scaled (fp16 gradients underflow unscaled;
    bf16 has fp32's exponent range and needs no scaler). A warm-up as long as the run is refused before anything is written."""
    if cfg.warmup_steps >= cfg.max_steps:  # warm-up starts at rate 0: the run would never train at the rate it sets
        raise TrainingError(f"train.warmup_steps={cfg.warmup_steps} ≥ train.max_steps={cfg.max_steps}: every step would warm up (the first at "
                            f"learning rate 0), never reaching train.lr; use train.warmup_steps < {cfg.max_steps}")
    run = _Run(recipe, cfg, parallel, work, resume=resume, compute_dtype=compute_dtype)
    state, checkpoint_every = run.state, cfg.checkpoint_every or cfg.eval_every
    start_wall = time.monotonic() - state.wall_seconds  # a resumed run's budget goes on from what it had spent, its evals too
    bar = tqdm(total=cfg.max_steps, initial=state.step, disable=not (progress and parallel.main), desc=recipe.name, dynamic_ncols=True)
    # A checkpoint of a run that early stopping or its time budget ended (its folder write failed, and --resume redoes
    # only the end) is finished: training on would give another adapter than the run that was not interrupted. A resume
    # with a larger train.max_minutes (or none) is how a run is given more time: that one goes on.
    stopped_by = "early_stopping" if state.stopped_early else "max_steps"
    if state.out_of_time and stopped_by == "max_steps":
        if _still_out_of_time(state, cfg):
            stopped_by = "max_minutes"
        else:
            state.out_of_time = 0.0  # given more time: the run goes on
    # Training mode is set here and again after each eval (which may leave eval mode), not every step: Module.train()
    # walks every module (2,499 in the 135M with LoRA, peft 0.21.2), host time a step spends for nothing.
    recipe.model.train()
    while state.step < cfg.max_steps and stopped_by == "max_steps":
        t0 = time.perf_counter()
        tokens = run.train_step()
        state.step += 1
        state.tokens += tokens
        bar.update(1)

        last = state.step == cfg.max_steps
        out_of_time = cfg.max_minutes > 0 and parallel.agree(time.monotonic() - start_wall > cfg.max_minutes * 60)  # one scalar all-reduce
        evaluating = state.step % cfg.eval_every == 0 or last or out_of_time
        checkpointing = state.step % checkpoint_every == 0 or evaluating
        logged = state.step % cfg.log_every == 0 or checkpointing  # a window always ends at a checkpoint (see _Run)
        means = run.read_window() if logged else {}  # the row's one host sync; stops on a non-finite loss
        state.train_seconds += time.perf_counter() - t0  # after the sync, so queued GPU work is counted
        if logged:
            run.log_row(means, bar)
        if evaluating and run.evaluate(bar):  # True: patience ran out
            stopped_by, state.stopped_early = "early_stopping", True
        if evaluating:
            recipe.model.train()  # the eval may have left it in eval mode
        if out_of_time and stopped_by == "max_steps":
            stopped_by, state.out_of_time = "max_minutes", cfg.max_minutes
        if state.step % checkpoint_every == 0 or stopped_by != "max_steps":
            state.wall_seconds = time.monotonic() - start_wall
            run.checkpoint()
        if stopped_by != "max_steps":
            break
    bar.close()
    run.load_best()
    return LoopResult(state, stopped_by)


class _Run:
    """One fit() call's moving parts (model, optimizer, schedule, checkpoint, the best weights, the log window) and the
    named steps fit()'s loop takes with them."""

    def __init__(self, recipe: Recipe, cfg: LoopConfig, parallel: Parallel, work, *, resume: bool,
                 compute_dtype: torch.dtype) -> None:
        """Set up: optimizer, schedule, DDP; then the checkpoint's progress when resuming, and a fresh metrics.jsonl."""
        self.recipe, self.cfg, self.parallel, self.work = recipe, cfg, parallel, work
        parallel.check_shared(Path(work).parent)  # before anything is written there
        groups = _decay_groups(recipe.param_groups(), recipe.model)
        self.extra = recipe.extra_params()
        self.params = [p for g in groups for p in g["params"]]
        for p in self.params:  # peft keeps adapters fp32 on a low-precision base (autocast_adapter_dtype); make sure of it
            if p.dtype != torch.float32:
                p.data = p.data.float()
        # Fused AdamW on CUDA: one kernel for every parameter instead of a few per tensor. Trainer's default
        # (adamw_torch_fused) also fuses on the CPU, and alone the CPU kernel's step is faster (242 LoRA-shaped tensors:
        # 7.7-9.4 -> 1.3-1.9 ms), but a whole 8-bit sst2 training step on the 135M measured slower with it (bench_train,
        # alternating, 2 rounds: 236 / 256 tokens/s per-tensor vs 183 / 227 fused), so the CPU keeps the per-tensor path.
        fused = self.params[0].device.type == "cuda"
        opt = torch.optim.AdamW(groups, weight_decay=groups[0].get("weight_decay", 0.0), fused=fused)
        # transformers' "constant" ignores num_warmup_steps: ours warms up as the spec says (constant_with_warmup,
        # which with 0 warm-up steps is "constant"), as linear and cosine do
        name = "constant_with_warmup" if cfg.schedule == "constant" else cfg.schedule
        sched = get_scheduler(name, opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps)
        self.call, self.opt, self.sched = parallel.prepare(recipe.model, opt, sched)
        self.raw_opt = getattr(self.opt, "optimizer", self.opt)  # the loss scaler keys its state by the torch optimizer
        parallel.seed_ranks(cfg.seed)  # a resume then restores each process's own generators (the checkpoint's)
        device = next(recipe.model.parameters()).device
        self.scaler = torch.amp.GradScaler(device.type, enabled=compute_dtype == torch.float16)
        self.ckpt = Checkpoint(work, parallel)
        self.state, self.best = RunState(), None
        if resume:
            saved = self.ckpt.load()
            check_resume(saved.get("run"), recipe.identity, work, parallel.world)
            recipe.load_trainable(saved["adapter"])
            recipe.load_state_dict(saved["recipe"])
            # a checkpoint written before wall_seconds was kept counts its steps' time (what its resume counted then)
            self.state, self.best = RunState(**{"wall_seconds": saved["state"].get("train_seconds", 0.0), **saved["state"]}), saved["best"]
            if saved.get("scaler") and self.scaler.is_enabled():
                self.scaler.load_state_dict(saved["scaler"])
            if parallel.main:
                ended = " (early stopping had ended the run there: nothing left to train)" if self.state.stopped_early else ""
                if self.state.out_of_time and not self.state.stopped_early:  # what this resume does, by fit()'s rule
                    ended = (f" (train.max_minutes={self.state.out_of_time:g} had ended the run there: " + (
                        "it trains no further; give a larger train.max_minutes, or 0, to train on)" if _still_out_of_time(self.state, cfg)
                        else f"train.max_minutes={cfg.max_minutes:g} gives it more time, so it trains on)"))
                print(f"resuming from step {self.state.step}{ended}", file=sys.stderr)
        if parallel.main:
            work.mkdir(parents=True, exist_ok=True)
            write_jsonl(work / "metrics.jsonl", self.state.history)
        # Logged values stay on the device and are summed there; reading them (a host sync that drains
        # the GPU queue) happens once per metrics row. A row holds the means over the steps since the
        # previous row; the window always ends at a checkpoint, so a resumed run writes exactly the rows
        # of an uninterrupted one. The first step whose loss was not finite is tracked on the device
        # too (0: none). Under fp16 the loss scaler skips such steps and recovers, so there only a
        # non-finite adapter (checked at each checkpoint) stops the run.
        self.window: dict[str, torch.Tensor] = {}
        self.window_steps, self.keys = 0, []
        self.first_bad = torch.zeros((), dtype=torch.long, device=device)
        self.grad_norm = torch.zeros((), device=device)  # the last step's, before clipping (a row logs it, as Trainer does)
        self.stop_on_bad_loss = not self.scaler.is_enabled()

    def train_step(self) -> int:
        """One optimizer step: micro-batches → loss → backward, clip → step → schedule; returns the tokens read."""
        cfg, parallel, scaler = self.cfg, self.parallel, self.scaler
        tokens, count, first, summed, step_logs = 0, 0.0, None, 0.0, {}
        for k in range(cfg.grad_accum):
            # DDP all-reduces the gradients once a step, in the last micro-batch's backward (no_sync before it)
            with parallel.no_sync(self.call, k < cfg.grad_accum - 1):
                part = self.recipe.step_loss(self.call, parallel)
                if not part.count > 0:
                    raise TrainingError(f"recipe {self.recipe.name!r} returned a micro-batch loss that counts {part.count} items; "
                                        "a loss must count at least one target token or row")
                first = part.count if first is None else first
                # The step's gradient is ∇(Σ sums) / Σ counts, but Σ counts is known only after the last micro-batch:
                # each sum is divided by the first micro-batch's count now (so the loss keeps a mean's size under the
                # fp16 scaler) and the gradients are rescaled by first / Σ counts below. × world: DDP averages.
                scaler.scale(part.loss * (parallel.world / first)).backward()
            tokens += part.tokens
            count += part.count
            summed = summed + part.loss.detach().float()
            for key, v in part.logs.items():
                step_logs[key] = step_logs.get(key, 0) + v.detach().float() / cfg.grad_accum
        step_logs["loss"] = summed * (parallel.world / count)  # the processes' mean of this is the step's loss
        for p in self.extra:  # parameters DDP does not hold: average their gradients here
            if p.grad is not None:
                p.grad = parallel.mean(p.grad)
        for p in self.recipe.idle_params():  # no row reached them: no gradient, as alone (see Recipe.idle_params)
            p.grad = None
        # The global batch's logged values: one collective for all of them (none when alone).
        self.keys = keys = sorted(step_logs)
        values = parallel.mean(torch.stack([step_logs[k] for k in keys])) if parallel.world > 1 else [step_logs[k] for k in keys]
        for k, v in zip(keys, values):
            self.window[k] = self.window.get(k, 0) + v
        if "loss" in step_logs:
            self.first_bad = torch.where((self.first_bad == 0) & ~torch.isfinite(values[keys.index("loss")]), self.state.step + 1, self.first_bad)
        scaler.unscale_(self.raw_opt)  # clip the true gradients (no-op unless fp16)
        if count != first:  # the accumulated sums over the step's total count (see above)
            torch._foreach_mul_([p.grad for p in self.params if p.grad is not None], first / count)
        # max_grad_norm 0: no clipping, as in Trainer (clipping to norm 0 would zero every gradient); the norm is still
        # measured (a clip to inf multiplies by exactly 1)
        limit = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
        self.grad_norm = torch.nn.utils.clip_grad_norm_(self.params, limit).detach().float()
        scaler.step(self.raw_opt)
        scaler.update()
        self.step_lr = self.sched.get_last_lr()[0]  # the rate this step used, what a row logs (as Trainer does), not the next's
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.window_steps += 1
        return tokens

    def read_window(self) -> dict[str, float]:
        """The logged values' means since the previous row and the last step's grad_norm, in the one host sync per row; then a
        new window starts."""
        means = torch.stack([self.window[k] / self.window_steps for k in self.keys] + [self.grad_norm, self.first_bad.float()]).tolist()  # the one host sync
        values, bad_step = {**dict(zip(self.keys, means[:-2])), "grad_norm": means[-2]}, int(means[-1])
        self.window, self.window_steps = {}, 0
        if bad_step and self.stop_on_bad_loss:
            raise TrainingError(f"training stopped: the loss became non-finite at step {bad_step} (window mean {values.get('loss')}); "
                                f"nothing was saved past the last good checkpoint {_where(self.ckpt)}; lower train.lr "
                                "(or raise train.warmup_steps) and train again with --overwrite (not --resume: it would continue the same run)")
        return values

    def log_row(self, means: dict[str, float], bar) -> None:
        """One metrics row: the window's means, the learning rate of its last step, the throughput so far."""
        state = self.state
        tps = state.tokens / max(state.train_seconds, 1e-9)
        row = {"step": state.step, **{k: (round(v, 5) if math.isfinite(v) else None) for k, v in means.items()},
               "lr": self.step_lr, "tokens_per_s": round(tps, 1)}  # JSON has no inf/NaN (an fp16 overflow)
        self.record(row)
        bar.set_postfix(loss=f"{means.get('loss', float('nan')):.4f}", tok_s=f"{tps:.0f}")

    def evaluate(self, bar) -> bool:
        """Evaluate (every process its share), keep the best weights; True when early stopping's patience ran out."""
        cfg, parallel, state = self.cfg, self.parallel, self.state
        score, row = self.recipe.evaluate(cfg.eval_samples, parallel)  # the same on every process: the same decisions
        self.recipe.observe(row)
        self.record({"step": state.step, **row})
        # Two bests: the weights kept are the best seen (any gain); patience counts evals that did not
        # beat the score of the last *real* improvement by more than min_delta (Keras' EarlyStopping).
        improved = state.best_metric is None or score > state.best_metric
        if state.plateau_score is None or score > state.plateau_score + cfg.min_delta:
            state.plateau_score, state.bad_evals = score, 0
        else:
            state.bad_evals += 1
        if improved:
            state.best_metric, state.best_step = score, state.step
            self.best = {k: v.detach().cpu().clone() for k, v in self.recipe.trainable().items()}  # keep the best, not the last
        if parallel.main:
            bar.write(f"step {state.step}: dev {score:.4f} (best {state.best_metric:.4f} @ {state.best_step})", file=sys.stderr)
        return bool(cfg.patience and state.bad_evals >= cfg.patience and state.step >= cfg.min_steps)

    def checkpoint(self) -> None:
        """Save the adapter, the best weights, the counters and the recipe's progress (all a resume needs)."""
        trained = self.recipe.trainable()
        if nonfinite_tensors(trained):  # a diverged adapter never replaces a good checkpoint
            raise self._diverged()
        self.ckpt.save({"adapter": {k: v.detach().cpu() for k, v in trained.items()}, "best": self.best, "state": self.state.__dict__,
                        "recipe": self.recipe.state_dict(), "run": self.recipe.identity,
                        "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None})

    def load_best(self) -> None:
        """Load the best evaluated weights (if any eval ran); what fit() returns must be finite."""
        if self.best is not None:
            self.recipe.load_trainable(copy.deepcopy(self.best))
        if nonfinite_tensors(self.recipe.trainable()):
            raise self._diverged()

    def record(self, row: dict) -> None:
        self.state.history.append(row)
        if self.parallel.main:
            with open(self.work / "metrics.jsonl", "a") as fh:  # append-only log for `tail -f`; rewritten on resume
                fh.write(json.dumps(row) + "\n")

    def _diverged(self) -> TrainingError:
        return TrainingError(f"training stopped: the adapter's weights became non-finite by step {self.state.step}; nothing was saved past "
                             f"the last good checkpoint {_where(self.ckpt)}; lower train.lr and train again with --overwrite (not --resume)")


def _decay_groups(groups: list[dict], model: torch.nn.Module) -> list[dict]:
    """The recipe's optimizer groups with transformers Trainer's weight-decay rule: a group's biases and norm weights
    (a LayerNorm, or a name with bias / layernorm / rmsnorm / norm, e.g. peft's `modules_to_save=[norm]` copies) move to
    a group of their own without decay. A group with no such parameter stays as it is (its checkpoints resume)."""
    if not any(g.get("weight_decay") for g in groups):
        return groups
    from transformers import Trainer  # its rule, not a copy of it; the method reads nothing of the Trainer instance

    decays = set(Trainer.get_decay_parameter_names(None, model))
    names = {id(p): n for n, p in model.named_parameters()}
    spared = {id(p) for p in model.parameters() if names[id(p)] not in decays}
    out = []
    for group in groups:
        keep = [p for p in group["params"] if id(p) not in spared]
        spare = [p for p in group["params"] if id(p) in spared]
        if not group.get("weight_decay") or not spare:
            out.append(group)
            continue
        if keep:
            out.append({**group, "params": keep})
        out.append({**group, "params": spare, "weight_decay": 0.0})
    return out


def _where(ckpt: Checkpoint) -> str:
    folder = ckpt.find()
    return f"(in {folder})" if folder else "(none was written yet)"
