"""Loss weighting and task sampling rules give what their formulas say."""

import math
from collections import Counter

import pytest
import torch

from adapterhub_lite.core.errors import SpecError
from adapterhub_lite.training.mixing import TaskSampler
from adapterhub_lite.training.weighting import make_weighting

TASKS = ["a", "b", "c"]


def test_equal_and_fixed(device):
    losses = {"a": torch.tensor(1.0, device=device), "b": torch.tensor(2.0, device=device), "c": torch.tensor(6.0, device=device)}
    assert make_weighting("equal", TASKS).combine(losses).item() == pytest.approx(3.0)
    fixed = make_weighting("fixed", TASKS, weights={"a": 1.0, "b": 0.5, "c": 0.0})
    assert fixed.combine(losses).item() == pytest.approx(2.0) and fixed.weights() == {"a": 1.0, "b": 0.5, "c": 0.0}
    with pytest.raises(SpecError, match=r"missing \['c'\]"):
        make_weighting("fixed", TASKS, weights={"a": 1.0, "b": 1.0})


def test_dynamic_sigmoid_follows_the_recent_loss_history(device):
    w = make_weighting("dynamic", TASKS, alpha=4.0, beta=1.0, window=3)
    assert w.weights() == {t: 0.5 for t in TASKS}  # no history: sigmoid(0)
    for step in [{"a": 3.0, "b": 1.0, "c": 0.2}, {"a": 1.0, "b": 1.0, "c": 0.2}, {"a": 2.0, "b": 1.0, "c": 0.2}, {"a": 0.0, "b": 1.0, "c": 0.2}]:
        w.observe(step)
    recent_a = (1.0 + 2.0 + 0.0) / 3  # the window keeps the last three
    sig = lambda x: 1 / (1 + math.exp(-4.0 * (x - 1.0)))  # noqa: E731
    assert w.weights() == pytest.approx({"a": sig(recent_a), "b": 0.5, "c": sig(0.2)})
    total = w.combine({"a": torch.tensor(2.0, device=device), "c": torch.tensor(1.0, device=device)})  # only the tasks in this batch
    assert total.device == device and total.item() == pytest.approx(sig(recent_a) * 2.0 + sig(0.2) * 1.0)  # Σ λ_i L_i
    # this step's losses joined the history (on the losses' device), and a checkpoint round trip keeps it in order
    assert w.state_dict() == {"history": {"a": [2.0, 0.0, 2.0], "b": [1.0, 1.0, 1.0], "c": pytest.approx([0.2, 0.2, 1.0])}}
    again = make_weighting("dynamic", TASKS, alpha=4.0, beta=1.0, window=3)
    again.load_state_dict(w.state_dict())
    assert again.weights() == pytest.approx(w.weights()) and again.weights()["a"] == pytest.approx(sig(4.0 / 3))


def test_uncertainty_weighting_is_exp_minus_log_variance_and_learns(device):
    w = make_weighting("uncertainty", TASKS, device=device)
    assert w.log_var.device == device  # an optimizer parameter beside the adapters it is trained with
    with torch.no_grad():
        w.log_var.copy_(torch.tensor([0.0, math.log(2.0), -1.0]))
    losses = {"a": torch.tensor(1.0, device=device), "b": torch.tensor(4.0, device=device), "c": torch.tensor(0.5, device=device)}
    want = 1.0 + 0.0 + 4.0 / 2 + math.log(2.0) + math.e * 0.5 - 1.0
    assert w.combine(losses).item() == pytest.approx(want)
    assert w.weights() == pytest.approx({"a": 1.0, "b": 0.5, "c": math.e})
    w.combine(losses).backward()  # d/ds (e^-s L + s) = 1 - e^-s L
    assert w.log_var.grad.tolist() == pytest.approx([1 - 1.0, 1 - 4.0 / 2, 1 - math.e * 0.5])


SIZES = {"a": 6000, "b": 2000, "c": 500}


@pytest.mark.parametrize("rule, want", [
    ("proportional", {t: n / 8500 for t, n in SIZES.items()}),
    ("temperature", {t: n ** 0.5 / sum(m ** 0.5 for m in SIZES.values()) for t, n in SIZES.items()}),
])
def test_sampling_proportions_match_the_rule_over_many_draws(rule, want):
    s = TaskSampler(SIZES, rule, temperature=2.0, seed=1)
    assert s.probabilities() == pytest.approx(want)
    counts = Counter(s.draw_batch(20000))
    for t, p in want.items():
        assert counts[t] / 20000 == pytest.approx(p, abs=0.015)


def test_round_robin_and_dynamic():
    s = TaskSampler(SIZES, "round_robin")
    assert s.draw_batch(7) == ["a", "b", "c", "a", "b", "c", "a"]
    d = TaskSampler(SIZES, "dynamic", epsilon=0.01, seed=2)
    for t, (best, now) in {"a": (0.9, 0.9), "b": (0.8, 0.6), "c": (0.7, 0.6)}.items():
        d.observe(t, best)
        d.observe(t, now)
    lag = {"a": 0.01, "b": 0.21, "c": 0.11}
    want = {t: v / sum(lag.values()) for t, v in lag.items()}
    assert d.probabilities() == pytest.approx(want)
    counts = Counter(d.draw_batch(20000))
    assert all(counts[t] / 20000 == pytest.approx(p, abs=0.015) for t, p in want.items())
