"""fit() at the ends of a run and of a log window, on the toy recipe (no backbone; each test runs in about a second):
a short last window, a run out of its time budget, early stopping, weights gone non-finite, a resumed metrics log."""

import dataclasses
import json
import time
import types

import pytest
import torch

from adapterhub_lite.training import loop as loop_mod
from adapterhub_lite.training.checkpoint import Checkpoint
from adapterhub_lite.training.loop import LoopConfig, fit
from adapterhub_lite.training.parallel import Parallel
from adapterhub_lite.training.progress import TrainingError

from .conftest import crash_after_checkpoint
from .test_loop_vs_transformers import Toy


def _rows(work) -> list[dict]:
    return [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]


def _cfg(**settings) -> LoopConfig:
    return LoopConfig(**{"max_steps": 6, "eval_every": 100, "checkpoint_every": 100, "log_every": 1, **settings})


def test_a_short_last_window_logs_the_mean_of_its_own_steps(tmp_path, device):
    """log_every 4 over 6 steps: the row of step 6 closes a window of 2 steps, and holds their mean, not their sum ÷ 4."""
    fit(Toy(device), _cfg(), Parallel(device), tmp_path / "every", progress=False)
    per_step = {r["step"]: r["loss"] for r in _rows(tmp_path / "every") if "loss" in r}
    fit(Toy(device), _cfg(log_every=4), Parallel(device), tmp_path / "sparse", progress=False)
    rows = [r for r in _rows(tmp_path / "sparse") if "loss" in r]
    assert [r["step"] for r in rows] == [4, 6]
    assert rows[0]["loss"] == pytest.approx(sum(per_step[s] for s in (1, 2, 3, 4)) / 4, rel=1e-4)
    assert rows[1]["loss"] == pytest.approx((per_step[5] + per_step[6]) / 2, rel=1e-4)


class _Scored(Toy):
    """Toy whose evals return the given scores in turn (then the last one again)."""

    def __init__(self, device, scores):
        super().__init__(device)
        self.scores = list(scores)

    def evaluate(self, limit, parallel):
        score = self.scores.pop(0) if len(self.scores) > 1 else self.scores[0]
        return score, {"score": score}


def test_a_run_out_of_time_evaluates_and_checkpoints_the_step_it_stops_at(tmp_path, device, monkeypatch):
    """max_minutes ends the run at the step that crosses it: that step is evaluated (its weights can be the best; without
    the eval, fit() would return the last eval's weights, every step since lost) and checkpointed (a --resume with more
    time goes on from there, not from the last periodic checkpoint). A clock that moves 60 s a read crosses 2.5 minutes at
    step 3 of 8."""
    clock = iter(range(0, 10_000, 60))
    monkeypatch.setattr(loop_mod, "time", types.SimpleNamespace(monotonic=lambda: next(clock), perf_counter=time.perf_counter))
    result = fit(_Scored(device, [0.5]), _cfg(max_steps=8, max_minutes=2.5), Parallel(device), tmp_path, progress=False)
    assert (result.state.step, result.stopped_by) == (3, "max_minutes")
    assert [r["step"] for r in _rows(tmp_path) if "score" in r] == [3]
    assert result.state.best_step == 3
    assert Checkpoint(tmp_path).step() == 3
    # its folder not written (a full disk: rerun with --resume), the run resumes as stopped: with the budget that ended
    # it, it trains no further (it took another step at least, the budget counted without the evals' time); with more, on
    again = fit(_Scored(device, [0.5]), _cfg(max_steps=8, max_minutes=2.5), Parallel(device), tmp_path, resume=True, progress=False)
    assert (again.state.step, again.stopped_by) == (3, "max_minutes")
    more = fit(_Scored(device, [0.5]), _cfg(max_steps=8, max_minutes=100.0), Parallel(device), tmp_path, resume=True, progress=False)
    assert (more.state.step, more.stopped_by) == (8, "max_steps")


@pytest.mark.parametrize("minutes, said, steps", [
    (2.5, "train.max_minutes=2.5 had ended the run there: it trains no further; give a larger train.max_minutes, or 0, to train on", 3),
    (0.0, "train.max_minutes=2.5 had ended the run there: train.max_minutes=0 gives it more time, so it trains on", 8),
    (100.0, "train.max_minutes=2.5 had ended the run there: train.max_minutes=100 gives it more time, so it trains on", 8),
])
def test_resuming_a_run_out_of_time_says_whether_it_trains_on(tmp_path, device, monkeypatch, capsys, minutes, said, steps):
    """The resume of a run its budget ended said "it trains on only with a larger train.max_minutes, now 0" and then
    trained on (0 is no budget), and the same words where 100 minutes did train on: it says what the resume does."""
    clock = iter(range(0, 10_000, 60))
    monkeypatch.setattr(loop_mod, "time", types.SimpleNamespace(monotonic=lambda: next(clock), perf_counter=time.perf_counter))
    fit(_Scored(device, [0.5]), _cfg(max_steps=8, max_minutes=2.5), Parallel(device), tmp_path, progress=False)
    capsys.readouterr()
    resumed = fit(_Scored(device, [0.5]), _cfg(max_steps=8, max_minutes=minutes), Parallel(device), tmp_path, resume=True, progress=False)
    assert f"resuming from step 3 ({said})" in capsys.readouterr().err and resumed.state.step == steps


def test_early_stopping_checkpoints_the_step_it_stops_at_and_a_resume_trains_no_further(tmp_path, device, monkeypatch):
    """patience 1: the eval of step 2 does not beat step 1's, the run stops there, and its checkpoint is of step 2
    (checkpoint_every 100 never came): what a resume of the stopped run starts from. A run killed once that checkpoint
    is written (its folder write failed: the error says to rerun with --resume) is resumed as stopped, not trained on:
    the resume went on to step 3 (and, had its eval improved, to max_steps), an adapter the run never had."""
    cfg = _cfg(eval_every=1, patience=1)
    result = fit(_Scored(device, [0.5, 0.4, 0.6]), cfg, Parallel(device), tmp_path / "straight", progress=False)
    assert (result.state.step, result.stopped_by) == (2, "early_stopping")
    assert Checkpoint(tmp_path / "straight").step() == 2
    crash_after_checkpoint(monkeypatch, lambda: fit(_Scored(device, [0.5, 0.4]), cfg, Parallel(device), tmp_path / "resumed", progress=False), step=2)
    resumed = fit(_Scored(device, [0.6]), cfg, Parallel(device), tmp_path / "resumed", resume=True, progress=False)
    assert (resumed.state.step, resumed.stopped_by, resumed.state.best_step) == (2, "early_stopping", 1)
    def logged(run):  # the clock's figure aside
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in _rows(tmp_path / run)]
    assert logged("resumed") == logged("straight")


class _NanGradient(Toy):
    """Toy whose loss adds sqrt(0 · Σ bias): the loss stays finite, its gradient is 0 · inf = NaN (a custom loss's
    sqrt or norm at 0), so the first step's update leaves the weights NaN."""

    def step_loss(self, call, parallel):
        part = super().step_loss(call, parallel)
        return dataclasses.replace(part, loss=part.loss + torch.sqrt(self.model[0].bias.sum() * 0))


def test_weights_that_became_non_finite_never_replace_a_checkpoint(tmp_path, device):
    """A step that leaves the weights NaN while its loss (taken before the update) is finite: the checkpoint of that
    step is refused, naming the step, and none is written (a resume would go on from NaN weights). Without the check
    the run stopped only at the next step's NaN loss, the diverged checkpoint in place."""
    with pytest.raises(TrainingError, match="the adapter's weights became non-finite by step 1;") as err:
        fit(_NanGradient(device), _cfg(checkpoint_every=1, log_every=100), Parallel(device), tmp_path, progress=False)
    assert "\n" not in str(err.value)
    assert Checkpoint(tmp_path).find() is None


def test_a_resumed_run_keeps_the_rows_logged_before_the_crash(tmp_path, device, monkeypatch):
    """metrics.jsonl (the log a user tails) is rewritten on resume from the checkpoint's history, so it holds every step's
    row as an uninterrupted run's does, not only those after the resume."""
    cfg = _cfg(max_steps=4, checkpoint_every=2)
    fit(Toy(device), cfg, Parallel(device), tmp_path / "straight", progress=False)
    crash_after_checkpoint(monkeypatch, lambda: fit(Toy(device), cfg, Parallel(device), tmp_path / "resumed", progress=False), step=2)
    fit(Toy(device), cfg, Parallel(device), tmp_path / "resumed", resume=True, progress=False)
    steps = [r["step"] for r in _rows(tmp_path / "straight")]
    assert steps == [1, 2, 3, 4, 4]  # a row a step, and the eval of the last
    assert [r["step"] for r in _rows(tmp_path / "resumed")] == steps
    assert [r["loss"] for r in _rows(tmp_path / "resumed")[:2]] == [r["loss"] for r in _rows(tmp_path / "straight")[:2]]


def test_a_failed_save_after_an_interrupted_swap_keeps_and_names_the_previous_checkpoint(tmp_path, device, monkeypatch):
    """A crash between a swap's two renames leaves only checkpoint.old; the next save puts it back first, so when that
    save fails (a full disk) the refusal says the previous checkpoint is kept, where it is, not that none exists (which
    would send the user to --overwrite, discarding it)."""
    import errno
    import os

    ckpt = Checkpoint(tmp_path, Parallel(device))
    ckpt.save({"state": {"step": 2}})
    (tmp_path / "checkpoint").rename(tmp_path / "checkpoint.old")
    real = torch.save

    def disk_full(obj, f, *a, **kw):
        if os.path.basename(str(f)) == "state.pt":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(TrainingError, match=f"the previous checkpoint in {tmp_path / 'checkpoint'} is kept"):
        ckpt.save({"state": {"step": 4}})
    monkeypatch.undo()
    assert ckpt.step() == 2 and ckpt.find() == tmp_path / "checkpoint"


def test_a_resumed_run_spends_what_is_left_of_its_time_budget(tmp_path, device, monkeypatch):
    """max_minutes is the run's budget of wall-clock time, counted over its resumes: a run resumed at step 2 after 70 s
    has 5 s of its 75 s left, not a fresh 75 s. A clock of 10 s a read (each step reads it three times, a checkpoint once)."""
    def clock():
        ticks = iter(range(0, 10_000, 10))
        return types.SimpleNamespace(monotonic=lambda: next(ticks), perf_counter=lambda: next(ticks))

    cfg = _cfg(max_steps=8, checkpoint_every=2, max_minutes=1.25)
    monkeypatch.setattr(loop_mod, "time", clock())
    crash_after_checkpoint(monkeypatch, lambda: fit(Toy(device), cfg, Parallel(device), tmp_path, progress=False), step=2)
    assert Checkpoint(tmp_path).step() == 2
    monkeypatch.setattr(loop_mod, "time", clock())  # a new process: its clock starts anew
    result = fit(Toy(device), cfg, Parallel(device), tmp_path, resume=True, progress=False)
    # 70 s spent by the step-2 checkpoint; after it, step 3 reads 90 s of the budget's clock: 90 > 75 at step 3, as the run
    # not interrupted (its clock: 20, 50, then 90 at step 3). A budget counted from the steps' 40 s alone read 60, 90 and
    # stopped at step 4; one started afresh would read 20, 50, 80 and stop at step 5
    assert (result.state.step, result.stopped_by) == (3, "max_minutes")


class _Timed(_Scored):
    """_Scored on a fake clock (`clock.t`, seconds): a step takes 1 s, an eval 50 s."""

    def __init__(self, device, clock):
        super().__init__(device, [0.5])
        self.clock = clock

    def step_loss(self, call, parallel):
        self.clock.t += 1
        return super().step_loss(call, parallel)

    def evaluate(self, limit, parallel):
        self.clock.t += 50
        return super().evaluate(limit, parallel)


def test_a_resumed_run_counts_the_evals_before_its_crash_in_its_time_budget(tmp_path, device, monkeypatch):
    """train.max_minutes is wall-clock time, evals included; a resume took up the clock from the steps' time alone, so the
    evals before the crash were spent again (here: stopped at step 11, not 7). A step takes 1 s and an eval (every 2 steps)
    50 s, of a 120 s budget: step 6 ends its eval at 156 s, so step 7 (157 s) crosses it, resumed at step 4 or not."""
    clock = types.SimpleNamespace(t=0.0)
    monkeypatch.setattr(loop_mod, "time", types.SimpleNamespace(monotonic=lambda: clock.t, perf_counter=lambda: clock.t))
    cfg = _cfg(max_steps=20, eval_every=2, checkpoint_every=2, max_minutes=2.0)
    whole = fit(_Timed(device, clock), cfg, Parallel(device), tmp_path / "whole", progress=False)
    assert (whole.state.step, whole.stopped_by) == (7, "max_minutes")
    clock.t = 0.0
    crash_after_checkpoint(monkeypatch, lambda: fit(_Timed(device, clock), cfg, Parallel(device), tmp_path / "resumed", progress=False), step=4)
    clock.t = 5000.0  # a new process: its clock reads anything
    resumed = fit(_Timed(device, clock), cfg, Parallel(device), tmp_path / "resumed", resume=True, progress=False)
    assert (resumed.state.step, resumed.stopped_by) == (7, "max_minutes")
    assert resumed.state.wall_seconds == whole.state.wall_seconds == 207  # step 7 at 157 s, then its eval: as recorded
