"""What a resume checks and the order rows are read in (progress.py), without a backbone."""

import dataclasses

import pytest

from adapterhub_lite.core.data import Split
from adapterhub_lite.core.spec import spec_from_dict
from adapterhub_lite.training.progress import Cursor, next_rows, run_identity

BASE = {"name": "t", "type": "classification", "data": {"train": "t.jsonl", "dev": "d.jsonl"}, "prompt": "{a} ->",
        "label": "label", "labels": ["no", "yes"], "train": {"max_steps": 10, "batch_size": 4}}
DATA = {"train": Split([], [], "t.jsonl", "train-sha"), "dev": Split([], [], "d.jsonl", "dev-sha")}


def _identity(**changes) -> str:
    spec = dict(BASE, **{k: v for k, v in changes.items() if k != "train"})
    spec["train"] = {**BASE["train"], **changes.get("train", {})}
    return run_identity(spec_from_dict(spec), DATA)["sha256"]


@pytest.mark.parametrize("change", [
    {"train": {"patience": 3}}, {"train": {"min_delta": 0.1}}, {"train": {"min_steps": 5}}, {"train": {"eval_every": 5}},
    {"train": {"max_steps": 20}}, {"train": {"lr": 0.003}}, {"train": {"seed": 9}}, {"train": {"grad_accum": 2}},
    {"train": {"warmup_steps": 2}}, {"train": {"schedule": "cosine"}}, {"train": {"weight_decay": 0.1}},
    {"train": {"max_grad_norm": 0.5}}, {"train": {"max_length": 99}}, {"train": {"batch_size": 8}},
    {"prompt": "{a} =>"}, {"labels": ["yes", "no"]}, {"method": "ia3"},
])
def test_a_resume_refuses_every_setting_that_changes_the_run(change):
    """A checkpoint's run identity covers every setting that changes what is computed or when the run stops: a resume
    with another patience, min_delta, ... would continue the old optimizer and schedule under rules the run never had."""
    assert _identity(**change) != _identity()


@pytest.mark.parametrize("change", [{"name": "t2"}, {"train": {"max_minutes": 30}}, {"train": {"eval_batch_size": 7}},
                                    {"data": {"train": "moved/t.jsonl", "dev": "moved/d.jsonl"}}])
def test_a_resume_accepts_what_does_not_change_the_computation(change):
    """A new time budget, eval batch or data path (the data is compared by its sha256) may differ on resume."""
    assert _identity(**change) == _identity()


def test_each_epoch_reads_the_rows_in_a_new_order():
    """next_rows draws a new shuffle each epoch (seeded by its number): every epoch reads each row once, and the
    epochs' orders differ (one order repeated every epoch trains on the same batches again and again)."""
    cursor, lengths = Cursor(), [5] * 64
    epochs = [next_rows(cursor, lengths, 16, seed=0, micro_batches=1) + next_rows(cursor, lengths, 16, 0) +
              next_rows(cursor, lengths, 16, 0) + next_rows(cursor, lengths, 16, 0) for _ in range(3)]
    assert all(sorted(e) == list(range(64)) for e in epochs)
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    assert dataclasses.asdict(cursor)["epoch"] == 3


@pytest.mark.parametrize("change", [{"sampling": "uniform"}, {"temperature": 3.0}, {"weighting": "equal"}, {"shared_adapter": True},
                                    {"shared_r": 4}, {"patience": 2}, {"min_delta": 0.1}, {"eval_every": 3}, {"seed": 9},
                                    {"batch_size": 3}, {"weighting_args": {"alpha": 0.5}}])
def test_a_joint_resume_refuses_every_joint_setting_but_the_time_budget(change):
    """The joint run's identity covers its JointConfig (task sampling, loss weighting, stopping, ...) but max_minutes:
    a resume under another sampling rule would go on drawing tasks by a rule its sampler state was not made for."""
    from adapterhub_lite.training.joint_config import JointConfig
    from adapterhub_lite.training.progress import joint_identity

    specs = [spec_from_dict({**BASE, "name": n}) for n in ("a", "b")]
    data = {n: DATA for n in ("a", "b")}
    same = joint_identity(specs, JointConfig(), data)["sha256"]
    assert joint_identity(specs, JointConfig(**change), data)["sha256"] != same
    assert joint_identity(specs, JointConfig(max_minutes=30.0), data)["sha256"] == same


def test_a_refused_resume_names_every_difference_spec_and_data_together():
    """A resume whose spec and data both changed is refused naming both (not the spec alone: a user who restores it
    would be refused again for the data)."""
    from adapterhub_lite.training.progress import TrainingError, check_resume

    saved = run_identity(spec_from_dict(BASE), DATA)
    now = run_identity(spec_from_dict({**BASE, "train": {**BASE["train"], "lr": 0.5}}), {**DATA, "train": Split([], [], "t.jsonl", "new-sha")})
    with pytest.raises(TrainingError, match=r"train\.lr: .* → 0\.5; data train: sha256 train-sha → new-sha"):
        check_resume(saved, now, "work")


def test_a_resume_under_another_process_count_names_the_batch_size_that_fits():
    """A 2-process checkpoint (batch_size 2: global 4) resumed by one process with the same flags differs only in the
    global batch; the refusal says which train.batch_size resumes it here, not just 'restore them'."""
    from adapterhub_lite.training.progress import TrainingError, check_resume

    spec = spec_from_dict({**BASE, "train": {**BASE["train"], "batch_size": 2}})
    saved = run_identity(spec, DATA, processes=2)
    with pytest.raises(TrainingError, match=r"batch_size × processes: 4 → 2\); under 1 process\(es\) give train\.batch_size=4 \(the checkpoint's global batch 4\)"):
        check_resume(saved, run_identity(spec, DATA, processes=1), "work", processes=1)
    with pytest.raises(TrainingError, match=r"global batch 4 does not divide among 3 processes"):
        check_resume(saved, run_identity(spec, DATA, processes=3), "work", processes=3)
