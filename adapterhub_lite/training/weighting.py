"""Loss weighting across tasks trained jointly: equal, fixed, dynamic sigmoid, uncertainty.

Every rule turns the per-task losses of one step into one scalar to back-propagate, and reports
the per-task weights it used (they go to metrics.jsonl and the run's plot).
"""

from __future__ import annotations

import torch

from adapterhub_lite.core.errors import SpecError

RULES = ("equal", "fixed", "dynamic", "uncertainty")


class Equal:
    """Each task's loss at 1/N (N: the run's tasks), summed over the tasks present in a step's batch: the plain mean
    when every task is present; a task missing from a batch leaves its share out rather than raising the others'."""

    def __init__(self, tasks: list[str]):
        self.tasks = tasks

    def weights(self) -> dict[str, float]:
        return {t: 1.0 / len(self.tasks) for t in self.tasks}

    def combine(self, losses: dict[str, torch.Tensor], observed: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Weighted sum over the tasks present in this step's batch. `observed`: the losses a
        history-based rule records (in a data-parallel run, the global batch's, not this process's share)."""
        total = self.partial(losses, first=True)
        self.record(observed if observed is not None else {t: loss.detach() for t, loss in losses.items()})
        return total

    def partial(self, losses: dict[str, torch.Tensor], first: bool) -> torch.Tensor:
        """One micro-batch's part of a step's combined loss: `losses` are its parts of the step's task losses (they add
        up to them over the micro-batches), so the parts add up to combine() of the step. Nothing is recorded (record()
        does, once a step). `first`: the step's first micro-batch, which carries what the rule adds once a step for the
        tasks of `losses` (every task of the step: a micro-batch without rows of one gives it a zero part)."""
        w = self.weights()
        return sum(w[t] * loss for t, loss in losses.items())

    def record(self, observed: dict[str, torch.Tensor]) -> None:
        """A step's task losses, for a rule that weighs by their history."""

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
    The history is a ring buffer on the losses' device: `combine` records this step's losses and
    weighs them without reading anything back to the host (a GPU step does not wait for it);
    only `weights()` (for logging) and `state_dict()` (checkpoints) copy numbers to the host.
    """

    def __init__(self, tasks: list[str], alpha: float = 5.0, beta: float = 0.5, window: int = 20):
        super().__init__(tasks)
        self.alpha, self.beta, self.window = alpha, beta, window
        self.index = {t: i for i, t in enumerate(tasks)}
        self.values = torch.zeros(len(tasks), window)  # task i's last losses, slot next[i] is overwritten next
        self.count = torch.zeros(len(tasks))  # how many slots of each row hold a loss (≤ window)
        self.next, self.filled = [0] * len(tasks), [0] * len(tasks)  # host copies of the same bookkeeping

    def _to(self, device) -> None:
        if self.values.device != torch.device(device):
            self.values, self.count = self.values.to(device), self.count.to(device)

    def observe(self, losses: dict[str, float | torch.Tensor]) -> None:
        """Append each task's loss (a float, or a tensor left on its device) to its history."""
        for t, value in losses.items():
            i = self.index[t]
            if isinstance(value, torch.Tensor):
                self._to(value.device)
                self.values[i, self.next[i]] = value.detach()  # device to device: no host sync
            else:
                self.values[i, self.next[i]] = float(value)
            self.next[i] = (self.next[i] + 1) % self.window
            self.filled[i] = min(self.filled[i] + 1, self.window)
            self.count[i] = self.filled[i]

    def _weights(self) -> torch.Tensor:
        # no history yet: recent = β, the midpoint weight 0.5
        recent = torch.where(self.count > 0, self.values.sum(1) / self.count.clamp_min(1), self.beta)
        return torch.sigmoid(self.alpha * (recent - self.beta))

    def weights(self) -> dict[str, float]:
        return dict(zip(self.tasks, self._weights().tolist()))

    def partial(self, losses: dict[str, torch.Tensor], first: bool) -> torch.Tensor:
        """Σ λ_i L_i with λ from the history *before* this step (combine: then this step's losses, or `observed`, join it)."""
        if losses:
            self._to(next(iter(losses.values())).device)
        w = self._weights()
        return sum(w[self.index[t]] * loss for t, loss in losses.items())

    def record(self, observed: dict[str, torch.Tensor]) -> None:
        self.observe(observed)

    def state_dict(self) -> dict:
        rows = self.values.tolist()
        return {"history": {t: [rows[i][(self.next[i] - self.filled[i] + k) % self.window] for k in range(self.filled[i])]
                            for t, i in self.index.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.values.zero_()
        self.count.zero_()
        self.next, self.filled = [0] * len(self.tasks), [0] * len(self.tasks)
        for t, values in state["history"].items():
            for v in values[-self.window:]:
                self.observe({t: float(v)})


class Uncertainty(Equal):
    """Kendall, Gal & Cipolla (2018): learned log-variances s_i, loss = Σ exp(−s_i)·L_i + s_i.

    The s_i are trained with the adapters; a noisy task learns a large s_i and weighs less,
    and the + s_i term keeps every weight from collapsing to zero.
    """

    def __init__(self, tasks: list[str], device: str | torch.device | None = None):
        super().__init__(tasks)
        # On the losses' device, made before the optimizer sees it (a resumed optimizer's state
        # follows the parameter's device at load time, so it cannot move later).
        self.log_var = torch.nn.Parameter(torch.zeros(len(tasks), device=device))
        self.index = {t: i for i, t in enumerate(tasks)}

    def weights(self) -> dict[str, float]:
        return dict(zip(self.tasks, torch.exp(-self.log_var.detach()).tolist()))  # one host copy, not one per task

    def state_dict(self) -> dict:
        return {"log_var": self.log_var.detach().clone()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.log_var.copy_(state["log_var"])

    def partial(self, losses: dict[str, torch.Tensor], first: bool) -> torch.Tensor:
        """Σ exp(−s_i)·L_i, and the step's + s_i once (in its first micro-batch), for each task of the step."""
        total = sum(torch.exp(-self.log_var[self.index[t]]) * loss for t, loss in losses.items())
        return total + sum(self.log_var[self.index[t]] for t in losses) if first else total

    def parameters(self) -> list[torch.nn.Parameter]:
        return [self.log_var]


def make_weighting(rule: str, tasks: list[str], device: str | torch.device | None = None, **kwargs):
    """A weighting rule by name: equal, fixed (weights=…), dynamic (alpha, beta, window), uncertainty.

    `device`: where the per-task losses live; the learned weights of `uncertainty` are made there
    (pass it: they become optimizer parameters). The other rules follow the losses they are given.
    """
    rules = {"equal": Equal, "fixed": Fixed, "dynamic": DynamicSigmoid, "uncertainty": Uncertainty}
    if rule not in rules:
        raise SpecError([f"weighting {rule!r} is not one of {', '.join(RULES)}"], "weighting")
    if rule == "uncertainty":
        kwargs["device"] = device
    return rules[rule](tasks, **kwargs)
