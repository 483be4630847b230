"""fit() against transformers' own reference functions, on a toy recipe (no backbone: each test runs in well under a second).

What a user compares our loop with is transformers' Trainer: its learning-rate schedules, its gradient clipping
after the loss is divided by the step's item count (num_items_in_batch), its AdamW defaults."""


import pytest
import torch
import torch.optim.optimizer as optim_hooks
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from adapterhub_lite.training.loop import LoopConfig, Recipe, StepLoss, fit
from adapterhub_lite.training.parallel import Parallel


class Toy(Recipe):
    """Least squares on random rows, read in order: a step's loss is summed over its rows' squared errors."""

    name = "toy"
    identity = {"sha256": "toy", "spec": {}, "data": {}}

    def __init__(self, rows: int = 64, batch: int = 4, lr: float = 0.1, weight_decay: float = 0.0):
        g = torch.Generator().manual_seed(0)
        self.model = torch.nn.Linear(3, 2)
        with torch.no_grad():
            for p in self.model.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        self.x, self.y = torch.randn(rows, 3, generator=g), 5 * torch.randn(rows, 2, generator=g)
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
    """fit() the recipe; returns the learning rate of every optimizer step it took (read as the step runs)."""
    used = []
    handle = optim_hooks.register_optimizer_step_pre_hook(lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
    try:
        cfg = LoopConfig(**{"max_steps": 8, "eval_every": 100, "checkpoint_every": 100, "log_every": 1, **settings})
        fit(recipe, cfg, Parallel(torch.device("cpu")), tmp_path, progress=False)
    finally:
        handle.remove()
    return used


REFERENCE = {
    "linear": lambda opt, warmup, total: get_linear_schedule_with_warmup(opt, warmup, total),
    "cosine": lambda opt, warmup, total: get_cosine_schedule_with_warmup(opt, warmup, total),
    "constant": lambda opt, warmup, total: get_constant_schedule_with_warmup(opt, warmup),
}


@pytest.mark.parametrize("schedule", sorted(REFERENCE))
def test_each_steps_learning_rate_is_transformers_schedule_with_its_warmup(schedule, tmp_path):
    """`schedule` with `warmup_steps`: the rate of every optimizer step is transformers' get_*_schedule_with_warmup's over
    max_steps. transformers' get_scheduler("constant") drops the warm-up; ours must not (the spec asked for it)."""
    used = _fit(Toy(), tmp_path, schedule=schedule, warmup_steps=3, max_steps=8)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched, want = REFERENCE[schedule](opt, 3, 8), []
    for _ in range(8):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert used == pytest.approx(want, abs=1e-12)
    assert used[:4] == pytest.approx([0.0, 0.1 / 3, 0.2 / 3, 0.1])  # warm-up ends at step warmup_steps + 1, at the full rate
