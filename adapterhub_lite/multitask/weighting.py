"""Loss weighting across tasks trained jointly: equal, fixed, dynamic sigmoid, uncertainty.

Every rule turns the per-task losses of one step into one scalar to back-propagate, and reports
the per-task weights it used (they go to metrics.jsonl and the run's plot).
"""

from __future__ import annotations

import math
from collections import deque

import torch

from ..errors import SpecError

RULES = ("equal", "fixed", "dynamic", "uncertainty")


class Equal:
    """The plain mean of the per-task losses."""

    def __init__(self, tasks: list[str]):
        self.tasks = tasks

    def weights(self) -> dict[str, float]:
        return {t: 1.0 / len(self.tasks) for t in self.tasks}

    def combine(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """Weighted sum over the tasks present in this step's batch."""
        w = self.weights()
        return sum(w[t] * loss for t, loss in losses.items())

    def parameters(self) -> list[torch.nn.Parameter]:
        return []

    def state_dict(self) -> dict:
        """What a resumed run needs to go on weighting exactly as before."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Fixed(Equal):
    """Weights given by the user, used as they are."""

    def __init__(self, tasks: list[str], weights: dict[str, float]):
        super().__init__(tasks)
        missing = sorted(set(tasks) - set(weights))
        if missing:
            raise SpecError([f"fixed weighting needs a weight for every task; missing {missing}"], "weighting")
        self.fixed = {t: float(weights[t]) for t in tasks}

    def weights(self) -> dict[str, float]:
        return dict(self.fixed)


class DynamicSigmoid(Equal):
    """λ_i = 1 / (1 + exp(−α (L_i − β))), L_i = task i's mean loss over its last `window` steps.

    A task whose recent loss is high (still hard) weighs more; one already solved fades. The
    weights come from the loss *history*, not from this step's graph, so they carry no gradient.
    """

    def __init__(self, tasks: list[str], alpha: float = 5.0, beta: float = 0.5, window: int = 20):
        super().__init__(tasks)
        self.alpha, self.beta = alpha, beta
        self.history = {t: deque(maxlen=window) for t in tasks}

    def observe(self, losses: dict[str, float]) -> None:
        for t, value in losses.items():
            self.history[t].append(float(value))

    def weights(self) -> dict[str, float]:
        out = {}
        for t in self.tasks:
            h = self.history[t]
            recent = sum(h) / len(h) if h else self.beta  # no history yet: the midpoint weight 0.5
            out[t] = 1.0 / (1.0 + math.exp(-self.alpha * (recent - self.beta)))
        return out

    def combine(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        total = super().combine(losses)
        self.observe({t: loss.detach().item() for t, loss in losses.items()})
        return total

    def state_dict(self) -> dict:
        return {"history": {t: list(h) for t, h in self.history.items()}}

    def load_state_dict(self, state: dict) -> None:
        for t, values in state["history"].items():
            self.history[t].clear()
            self.history[t].extend(values)


class Uncertainty(Equal):
    """Kendall, Gal & Cipolla (2018): learned log-variances s_i, loss = Σ exp(−s_i)·L_i + s_i.

    The s_i are trained with the adapters; a noisy task learns a large s_i and weighs less,
    and the + s_i term keeps every weight from collapsing to zero.
    """

    def __init__(self, tasks: list[str]):
        super().__init__(tasks)
        self.log_var = torch.nn.Parameter(torch.zeros(len(tasks)))
        self.index = {t: i for i, t in enumerate(tasks)}

    def weights(self) -> dict[str, float]:
        return {t: math.exp(-self.log_var[i].item()) for t, i in self.index.items()}

    def state_dict(self) -> dict:
        return {"log_var": self.log_var.detach().clone()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.log_var.copy_(state["log_var"])

    def combine(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(torch.exp(-self.log_var[self.index[t]]) * loss + self.log_var[self.index[t]] for t, loss in losses.items())

    def parameters(self) -> list[torch.nn.Parameter]:
        return [self.log_var]


def make_weighting(rule: str, tasks: list[str], **kwargs):
    """A weighting rule by name: equal, fixed (weights=…), dynamic (alpha, beta, window), uncertainty."""
    rules = {"equal": Equal, "fixed": Fixed, "dynamic": DynamicSigmoid, "uncertainty": Uncertainty}
    if rule not in rules:
        raise SpecError([f"weighting {rule!r} is not one of {', '.join(RULES)}"], "weighting")
    return rules[rule](tasks, **kwargs)
