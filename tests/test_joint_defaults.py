"""train-multi's defaults are train's: a key its specs leave out is chosen by the same rules (defaults.py), printed and recorded."""

import json
import math

import pytest

from adapterhub_lite.core.data import load_task_data
from adapterhub_lite.core.errors import SpecError
from adapterhub_lite.core.spec import spec_from_dict
from adapterhub_lite.model.backbone import load_backbone
from adapterhub_lite.training.defaults import EXAMPLE_BUDGET, MAX_EPOCHS, default_warmup, lora_lr, resolve, resolve_joint
from adapterhub_lite.training.joint_config import JointConfig
from adapterhub_lite.training.recipes.joint import train_joint

from .test_multitask_joint import _write_tasks


def _specs(a_train: dict, g_train: dict, r_a: int = 4):
    def one(name, kind, train, r):
        raw = {"name": name, "type": kind, "data": {"train": f"{name}.jsonl", "dev": f"{name}.jsonl"}, "prompt": "T: {text}\nA:",
               "base": "tiny-random-llama", "quantization": "none", "method": "lora", "method_args": {"r": r, "target_modules": ["q_proj", "v_proj"]}}
        raw.update({"label": "label", "labels": ["yes", "no"]} if kind == "classification" else {"target": "target"})
        if train:
            raw["train"] = train
        return spec_from_dict(raw)
    return [one("a", "classification", a_train, r_a), one("g", "generation", g_train, 8)]


def test_train_multi_chooses_what_its_specs_leave_out_as_train_does_and_records_it(tmp_path, monkeypatch, capsys):
    """train-multi took TrainConfig's fixed fallbacks for what its specs left out (eval_every 50, lr 1e-3 at any rank,
    warmup 20, eval_samples 200, max_length 256), where `train` chooses from the data, the run and the rank; and its
    run.json showed only the fallbacks. Now the same rules choose them, the run prints them and run.json and each task's
    sidecar record the values used and why."""
    monkeypatch.chdir(tmp_path)
    _write_tasks(tmp_path, copies={"a": 4, "g": 4})
    specs = _specs({"max_steps": 2, "batch_size": 4}, {"max_steps": 2, "batch_size": 4})
    out = train_joint(specs, tmp_path / "mtl", progress=False)
    run = json.loads((out / "run.json").read_text())
    config = run["config"]
    assert (config["eval_every"], config["checkpoint_every"], config["warmup_steps"]) == (2, 2, default_warmup(2)[0])  # was 50, None, 20
    assert config["eval_samples"] == 12  # every dev row of the larger split (12 rows; generation caps it at 100), was 200
    assert run["defaults"]["run"]["train.eval_every"]["value"] == 2 and "train.max_steps" not in run["defaults"]["run"]  # given
    assert run["defaults"]["a"]["train.lr"] == {"value": lora_lr(4), "why": "suits LoRA rank 4 (1e-3 × sqrt(8 / r))"}
    sidecar = json.loads((out / "a" / "adapterhub.json").read_text())
    assert sidecar["task"]["train"]["lr"] == lora_lr(4) == 1.4e-3  # the rate its optimizer group used
    assert sidecar["task"]["train"]["eval_every"] == 2 and sidecar["defaults"]["train.eval_every"]["value"] == 2
    assert sidecar["task"]["train"]["max_length"] < 256  # the longest prompt + label word, as `train` chooses it
    err = capsys.readouterr().err
    assert "resolved joint run" in err and "eval_every: 2  # ~40 evals over 2 steps" in err, err


def test_a_joint_run_s_budget_and_stopping_follow_train_s_rules(tmp_path, monkeypatch):
    """Left out by every spec, the budget is the rows each task would get alone, summed; the evals, warm-up and early
    stopping are what `train` sets for a run of that many steps (one function sets both); each task's lr is the one
    `train` gives its rank. A key one spec gives and the other leaves out is the giver's (it was refused as differing
    from the other's fixed fallback)."""
    monkeypatch.chdir(tmp_path)
    _write_tasks(tmp_path, copies={"a": 40, "g": 30})  # 120 and 60 train rows
    backbone = load_backbone("tiny-random-llama", "none", "cpu")
    specs = _specs({}, {}, r_a=32)
    data = {s.name: load_task_data(s) for s in specs}
    resolved, cfg, choices = resolve_joint(specs, JointConfig.from_specs(specs), data, backbone.model, backbone.tokenizer)
    budget = min(MAX_EPOCHS * 120, EXAMPLE_BUDGET) + min(MAX_EPOCHS * 60, EXAMPLE_BUDGET)
    assert cfg.max_steps == math.ceil(budget / 16) == 225 and choices["run"]["train.max_steps"]["value"] == 225
    alone = resolve(spec_from_dict({**_raw(specs[0]), "train": {"max_steps": 225}}), data["a"], backbone.model, backbone.tokenizer)
    t = alone.spec.train
    assert (cfg.eval_every, cfg.warmup_steps, cfg.checkpoint_every) == (t.eval_every, t.warmup_steps, t.checkpoint_every)
    assert (cfg.patience, cfg.min_steps) == (2, 50) and cfg.min_delta == round(0.4 / math.sqrt(cfg.eval_samples), 4)
    assert [s.train.lr for s in resolved] == [lora_lr(32), lora_lr(8)] == [5e-4, 1e-3]
    assert all(s.train.max_steps == 225 and s.train.eval_every == cfg.eval_every for s in resolved)  # the run's, in each spec
    mixed = _specs({"max_steps": 7}, {})
    assert JointConfig.from_specs(mixed).max_steps == 7 and "max_steps" in JointConfig.from_specs(mixed).given
    with pytest.raises(SpecError, match=r"train.max_steps differs between the tasks \(a: 7, g: 9\)"):
        JointConfig.from_specs(_specs({"max_steps": 7}, {"max_steps": 9}))


def _raw(spec):
    raw = spec.to_dict()
    raw.pop("train")
    return raw


def test_a_joint_batch_larger_than_all_its_tasks_rows_is_refused_before_training_and_a_default_one_is_cut(tmp_path, monkeypatch):
    """`train` refuses a batch larger than its train split (each step would read rows twice) and cuts a default one;
    train-multi took a batch of 8 over 3 + 2 rows and trained, every step quietly reusing rows. Now it refuses a given
    batch in one line, before training or writing the run folder, and cuts a default one to the rows, as train does."""
    from adapterhub_lite.core.errors import DataError

    monkeypatch.chdir(tmp_path)
    _write_tasks(tmp_path, copies={"a": 1, "g": 1})  # 3 and 2 train rows
    specs = _specs({"max_steps": 2, "batch_size": 8}, {"max_steps": 2, "batch_size": 8})
    with pytest.raises(DataError, match=r"^train\.batch_size=8 × 1 process\(es\) = 8 rows a step, but the tasks have 5 training rows "
                                        r"together \(a: 3, g: 2\); use train\.batch_size ≤ 5$"):
        train_joint(specs, tmp_path / "mtl", progress=False)
    assert not (tmp_path / "mtl").exists()
    backbone = load_backbone("tiny-random-llama", "none", "cpu")
    left_out = _specs({"max_steps": 2}, {"max_steps": 2})
    data = {s.name: load_task_data(s) for s in left_out}
    _, cfg, choices = resolve_joint(left_out, JointConfig.from_specs(left_out), data, backbone.model, backbone.tokenizer)
    assert cfg.batch_size == 5 and choices["run"]["train.batch_size"]["value"] == 5


def test_tasks_that_cannot_share_a_backbone_or_dropout_are_refused_with_the_override_that_fixes_it():
    """Two specs with other lora_dropout (or base, quantization, dtype) were refused naming the values but not the fix;
    the command line's override, which applies to every spec, is it."""
    from adapterhub_lite.training.joint_config import check_specs

    a, g = _specs({}, {})
    a.method_args["lora_dropout"], a.dtype = 0.1, "fp32"
    with pytest.raises(SpecError) as err:
        check_specs([a, g])
    assert "pass method_args.lora_dropout=VALUE" in str(err.value) and "pass dtype=VALUE" in str(err.value)
