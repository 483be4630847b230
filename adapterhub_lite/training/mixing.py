"""Which task the next rows come from: proportional, temperature, round-robin, or dynamic.

    proportional   p_i ∝ n_i                 (big tasks dominate)
    temperature    p_i ∝ n_i^(1/T)           (T=1 proportional, T→∞ uniform)
    round_robin    tasks in turn
    dynamic        p_i ∝ lag_i + ε, lag_i = best dev metric so far − latest dev metric
"""

from __future__ import annotations

import torch

from adapterhub_lite.core.errors import SpecError

RULES = ("proportional", "temperature", "round_robin", "dynamic")


class TaskSampler:
    """Draws task names by one of the rules above, reproducibly from a seed."""

    def __init__(self, sizes: dict[str, int], rule: str = "proportional", temperature: float = 2.0,
                 epsilon: float = 0.05, seed: int = 0):
        if rule not in RULES:
            raise SpecError([f"sampling {rule!r} is not one of {', '.join(RULES)}"], "sampling")
        if rule == "temperature" and temperature <= 0:
            raise SpecError([f"sampling temperature must be > 0, got {temperature}"], "sampling")
        self.tasks, self.sizes = list(sizes), sizes
        self.rule, self.temperature, self.epsilon = rule, temperature, epsilon
        self.generator = torch.Generator().manual_seed(seed)
        self.turn = 0
        self.best: dict[str, float] = {}
        self.latest: dict[str, float] = {}

    def probabilities(self) -> dict[str, float]:
        """The current sampling distribution over tasks."""
        n = torch.tensor([float(self.sizes[t]) for t in self.tasks])
        if self.rule == "proportional":
            p = n
        elif self.rule == "temperature":
            p = n ** (1.0 / self.temperature)
        elif self.rule == "round_robin":
            p = torch.ones(len(self.tasks))
        else:
            p = torch.tensor([self.best.get(t, 0.0) - self.latest.get(t, 0.0) + self.epsilon for t in self.tasks])
        p = p / p.sum()
        return dict(zip(self.tasks, p.tolist()))

    def observe(self, task: str, metric: float) -> None:
        """Record a dev evaluation (higher is better), for the dynamic rule."""
        self.latest[task] = metric
        self.best[task] = max(metric, self.best.get(task, metric))

    def state_dict(self) -> dict:
        """Generator, turn and dev history: a resumed run draws exactly what it would have."""
        return {"generator": self.generator.get_state(), "turn": self.turn, "best": dict(self.best), "latest": dict(self.latest)}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.turn, self.best, self.latest = state["turn"], dict(state["best"]), dict(state["latest"])

    def draw(self) -> str:
        if self.rule == "round_robin":
            task = self.tasks[self.turn % len(self.tasks)]
            self.turn += 1
            return task
        p = torch.tensor(list(self.probabilities().values()))
        return self.tasks[int(torch.multinomial(p, 1, generator=self.generator))]

    def draw_batch(self, k: int) -> list[str]:
        """The task of each of the k rows of a mixed batch."""
        return [self.draw() for _ in range(k)]
