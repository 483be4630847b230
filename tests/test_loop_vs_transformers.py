"""fit() against transformers' own reference functions, on a toy recipe (no backbone: each test runs in well under a second).

What a user compares our loop with is transformers' Trainer: its learning-rate schedules, its gradient clipping
after the loss is divided by the step's item count (num_items_in_batch), its AdamW defaults."""


import copy
import dataclasses
import json

import pytest
import torch
import torch.optim.optimizer as optim_hooks
from transformers import Trainer, TrainingArguments, get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from adapterhub_lite.core.spec import spec_from_dict
from adapterhub_lite.training.loop import LoopConfig, Recipe, StepLoss, fit
from adapterhub_lite.training.parallel import Parallel
from adapterhub_lite.training.progress import TrainingError

from .conftest import crash_after_checkpoint


class Toy(Recipe):
    """Least squares on random rows, read in order: a step's loss is summed over its rows' squared errors."""

    name = "toy"
    identity = {"sha256": "toy", "spec": {}, "data": {}}

    def __init__(self, device: torch.device, rows: int = 64, batch: int = 4, lr: float = 0.1, weight_decay: float = 0.0):
        g = torch.Generator().manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
        with torch.no_grad():
            for p in self.model.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        self.model.to(device)
        self.x, self.y = torch.randn(rows, 3, generator=g).to(device), (5 * torch.randn(rows, 2, generator=g)).to(device)
        self.cursor, self.batch, self.lr, self.weight_decay = 0, batch, lr, weight_decay

    def param_groups(self):
        return [{"params": list(self.model.parameters()), "lr": self.lr, "weight_decay": self.weight_decay}]

    def next_rows(self) -> list[int]:
        rows = [(self.cursor + k) % len(self.x) for k in range(self.batch)]
        self.cursor += self.batch
        return rows

    def step_loss(self, call, parallel):
        rows = self.next_rows()
        out = call(self.x[rows])
        return StepLoss(((out - self.y[rows]) ** 2).sum(), float(out.numel()), len(rows))

    def evaluate(self, limit, parallel):
        return 0.0, {"score": 0.0}

    def trainable(self):
        return dict(self.model.state_dict())

    def load_trainable(self, values):
        self.model.load_state_dict(values)


def _fit(recipe, tmp_path, **settings):
    """fit() the recipe; returns the learning rate of every optimizer step it took (read as the step runs), and checks
    that metrics.jsonl logs it, as Trainer logs `learning_rate` (read before the scheduler steps), not the next step's."""
    used = []
    handle = optim_hooks.register_optimizer_step_pre_hook(lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
    try:
        cfg = LoopConfig(**{"max_steps": 8, "eval_every": 100, "checkpoint_every": 100, "log_every": 1, **settings})
        fit(recipe, cfg, Parallel(recipe.x.device), tmp_path, progress=False)
    finally:
        handle.remove()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if "lr" in r] == [used[r["step"] - 1] for r in rows if "lr" in r]
    return used


REFERENCE = {
    "linear": lambda opt, warmup, total: get_linear_schedule_with_warmup(opt, warmup, total),
    "cosine": lambda opt, warmup, total: get_cosine_schedule_with_warmup(opt, warmup, total),
    "constant": lambda opt, warmup, total: get_constant_schedule_with_warmup(opt, warmup),
}


@pytest.mark.parametrize("schedule", sorted(REFERENCE))
def test_each_steps_learning_rate_is_transformers_schedule_with_its_warmup(schedule, tmp_path, device):
    """`schedule` with `warmup_steps`: the rate of every optimizer step is transformers' get_*_schedule_with_warmup's over
    max_steps. transformers' get_scheduler("constant") drops the warm-up; ours must not (the spec asked for it)."""
    used = _fit(Toy(device), tmp_path, schedule=schedule, warmup_steps=3, max_steps=8)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched, want = REFERENCE[schedule](opt, 3, 8), []
    for _ in range(8):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert used == pytest.approx(want, abs=1e-12)
    assert used[:4] == pytest.approx([0.0, 0.1 / 3, 0.2 / 3, 0.1])  # warm-up ends at step warmup_steps + 1, at the full rate


def test_a_step_is_trainers_step_clip_decay_and_accumulation_included(tmp_path, device):
    """Trainer's step by hand: each micro-batch's summed loss ÷ the step's item count (num_items_in_batch), backward,
    clip_grad_norm_ over the trainable parameters, AdamW with Trainer's betas and eps and its weight-decay groups
    (biases and LayerNorm weights undecayed), the schedule; a row logs the step's pre-clip norm as Trainer's grad_norm. fit() takes the same steps (to 1e-6: it rescales the summed gradients once the step's count is known)."""
    ours = Toy(device, weight_decay=0.1)
    ref = copy.deepcopy(ours)
    _fit(ours, tmp_path, max_steps=6, warmup_steps=2, grad_accum=2, max_grad_norm=0.5)

    model, args = ref.model, TrainingArguments.__dataclass_fields__
    decay = set(Trainer.get_decay_parameter_names(None, model))
    assert decay == {"0.weight", "2.weight"}
    groups = [{"params": [p for n, p in model.named_parameters() if n in decay], "weight_decay": 0.1},
              {"params": [p for n, p in model.named_parameters() if n not in decay], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=0.1, betas=(args["adam_beta1"].default, args["adam_beta2"].default), eps=args["adam_epsilon"].default)
    sched, norms = get_linear_schedule_with_warmup(opt, 2, 6), []
    for _ in range(6):
        micro = [ref.next_rows() for _ in range(2)]
        items = sum(len(rows) * 2 for rows in micro)  # two outputs a row
        for rows in micro:
            (((model(ref.x[rows]) - ref.y[rows]) ** 2).sum() / items).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5).item())  # Trainer's grad_norm: before clipping
        assert norms[-1] > 0.5  # the clip bites
        opt.step()
        sched.step()
        opt.zero_grad()
    for (name, got), want in zip(ours.model.named_parameters(), model.parameters()):
        assert (got - want).abs().max().item() <= 1e-6, name
    logged = [r["grad_norm"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "grad_norm" in r]
    assert logged == pytest.approx(norms, abs=1e-5)  # each row (log_every 1) logs its step's norm as Trainer logs it


def test_max_grad_norm_0_means_no_clipping_as_in_trainer(tmp_path, device):
    """Trainer clips only when max_grad_norm > 0; clip_grad_norm_ to 0 would zero every gradient (an adapter that never moves)."""
    unclipped, never = Toy(device), Toy(device)
    _fit(unclipped, tmp_path / "a", max_steps=3, max_grad_norm=0.0)
    _fit(never, tmp_path / "b", max_steps=3, max_grad_norm=1e9)  # far above any norm here: never clips
    assert all(torch.equal(a, b) for a, b in zip(unclipped.model.parameters(), never.model.parameters()))
    assert not torch.equal(unclipped.model[0].weight, Toy(device).model[0].weight)  # it trained


@pytest.mark.parametrize("key, value", [("max_grad_norm", -1.0), ("weight_decay", -0.1), ("warmup_steps", -3)])
def test_a_negative_optimizer_setting_is_refused_at_the_spec(key, value):
    """A negative max_grad_norm flips every gradient (the loss rose from 0.60 to 1.11 in 4 steps), a negative warm-up
    was taken as given, a negative weight_decay failed in torch after the backbone loaded: each is refused in one line."""
    raw = {"name": "t", "type": "generation", "data": {"train": "a.jsonl", "dev": "a.jsonl"}, "prompt": "{x}", "target": "y",
           "train": {key: value}}
    with pytest.raises(ValueError, match=rf"train\.{key} must be ≥ 0, got {value}") as err:
        spec_from_dict(raw)
    assert "\n" not in str(err.value)


def test_every_step_trains_in_training_mode_without_resetting_the_mode_each_step(tmp_path, device):
    """fit() called model.train() before every step (walking every module: host time each step, 1,599 modules in the
    135M with LoRA); it sets training mode once and again after each eval. A recipe whose eval leaves eval mode behind
    still trains every step in training mode."""
    class EvalLeavesEvalMode(Toy):
        modes: list = []

        def step_loss(self, call, parallel):
            self.modes.append(self.model.training)
            return super().step_loss(call, parallel)

        def evaluate(self, limit, parallel):
            self.model.eval()
            return 0.0, {"score": 0.0}

    recipe = EvalLeavesEvalMode(device)
    recipe.model.eval()  # as a backbone comes from from_pretrained
    calls, train = [], torch.nn.Module.train
    torch.nn.Module.train = lambda self, mode=True: (calls.append(mode) if self is recipe.model else None) or train(self, mode)
    try:
        _fit(recipe, tmp_path, max_steps=6, eval_every=2)
    finally:
        torch.nn.Module.train = train
    assert recipe.modes == [True] * 6
    assert calls.count(True) == 1 + 3  # once before the loop, once after each of the 3 evals


def test_the_optimizer_is_trainers_adamw_fused_on_cuda_only(tmp_path, device):
    """fit() builds AdamW with Trainer's betas and eps (TrainingArguments' defaults); fused on CUDA, where one kernel
    replaces a few per tensor, and per-tensor on the CPU, where the fused kernel measured slower end to end (loop.py)."""
    seen = []
    handle = optim_hooks.register_optimizer_step_pre_hook(lambda opt, args, kwargs: seen.append(opt))
    try:
        fit(Toy(device), LoopConfig(max_steps=1, eval_every=100, checkpoint_every=100, log_every=1), Parallel(device), tmp_path, progress=False)
    finally:
        handle.remove()
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(TrainingArguments(output_dir=str(tmp_path / "t"), use_cpu=device.type == "cpu"))
    opt = seen[0]
    assert type(opt) is cls
    assert {k: opt.defaults[k] for k in ("betas", "eps")} == {"betas": kwargs["betas"], "eps": kwargs["eps"]}
    assert bool(opt.defaults["fused"]) == (device.type == "cuda")


def _cfg(**settings):
    return LoopConfig(**{"max_steps": 4, "eval_every": 100, "checkpoint_every": 100, "log_every": 1, **settings})


def test_under_fp16_the_scaled_step_is_the_unscaled_step(tmp_path, device):
    """compute_dtype fp16 turns on the loss scaler: the loss is scaled by a power of two before backward and the
    gradients unscaled before clipping, so each step equals the fp32 step exactly. A loss left unscaled, or
    gradients clipped while still scaled, change the steps (AdamW's eps then weighs gradients 2^16 times smaller)."""
    plain, scaled = Toy(device), Toy(device)
    fit(plain, _cfg(grad_accum=2, max_grad_norm=0.5), Parallel(device), tmp_path / "a", progress=False)
    fit(scaled, _cfg(grad_accum=2, max_grad_norm=0.5), Parallel(device), tmp_path / "b", progress=False, compute_dtype=torch.float16)
    assert not torch.equal(plain.model[0].weight, Toy(device).model[0].weight)  # it trained
    for (name, a), b in zip(plain.model.named_parameters(), scaled.model.parameters()):
        assert (a - b).abs().max().item() <= 1e-7, name


class Overflows(Toy):
    """Toy whose `overflow_at`-th micro-batch loss is inf (an fp16 overflow)."""

    def __init__(self, device, overflow_at=2):
        super().__init__(device)
        self.calls, self.overflow_at = 0, overflow_at

    def step_loss(self, call, parallel):
        part = super().step_loss(call, parallel)
        self.calls += 1
        return dataclasses.replace(part, loss=part.loss * float("inf")) if self.calls == self.overflow_at else part


def test_under_fp16_a_step_with_a_non_finite_loss_is_skipped_and_training_goes_on(tmp_path, device):
    """The scaler's contract (loop.py): under fp16 an overflowing step is skipped and the scale lowered; the run does not
    stop (in fp32 it would: nothing can recover there)."""
    recipe = Overflows(device)
    result = fit(recipe, _cfg(), Parallel(device), tmp_path, progress=False, compute_dtype=torch.float16)
    assert result.state.step == 4 and all(torch.isfinite(p).all() for p in recipe.model.parameters())
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses[1] is None and all(v is not None for v in losses[:1] + losses[2:])  # JSON null: the skipped step's inf


def test_a_resumed_fp16_run_goes_on_at_its_lowered_loss_scale(tmp_path, device, monkeypatch):
    """The scaler's state is in the checkpoint: resumed after an overflow halved the scale, the run goes on at that
    scale, as the uninterrupted run does (a fresh scaler would start at 2^16 again and overflow anew)."""
    scales, step = [], torch.amp.GradScaler.step
    monkeypatch.setattr(torch.amp.GradScaler, "step", lambda self, *a, **k: scales.append(self.get_scale()) or step(self, *a, **k))
    cfg = _cfg(checkpoint_every=2)
    fit(Overflows(device, overflow_at=1), cfg, Parallel(device), tmp_path / "straight", progress=False, compute_dtype=torch.float16)
    straight, scales[:] = list(scales), []
    assert straight[0] == 2 * straight[1] == 2 * straight[3]  # step 1 overflowed: the scale was halved once

    crash_after_checkpoint(monkeypatch, lambda: fit(Overflows(device, overflow_at=1), cfg, Parallel(device), tmp_path / "resumed",
                                                    progress=False, compute_dtype=torch.float16), step=2)
    scales[:] = []
    fit(Overflows(device, overflow_at=0), cfg, Parallel(device), tmp_path / "resumed", resume=True, progress=False, compute_dtype=torch.float16)
    assert scales == straight[2:]


def test_a_micro_batch_that_counts_nothing_is_refused_in_one_line(tmp_path, device):
    """The loss contract divides by the step's count: a recipe that says its sum counts 0 items is refused by name,
    not divided by zero into a NaN step."""
    class CountsNothing(Toy):
        def step_loss(self, call, parallel):
            return dataclasses.replace(super().step_loss(call, parallel), count=0.0)

    with pytest.raises(TrainingError, match="recipe 'toy' returned a micro-batch loss that counts 0.0 items") as err:
        fit(CountsNothing(device), _cfg(), Parallel(device), tmp_path, progress=False)
    assert "\n" not in str(err.value) and isinstance(err.value, ValueError)
