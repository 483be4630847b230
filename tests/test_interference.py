"""Interference report: task × adapter matrix, negative transfer flagged, JSON + heatmap."""

import json

import pytest

from adapterhub_lite.artifacts.loading import load_adapter
from adapterhub_lite.core.data import load_task_data
from adapterhub_lite.core.errors import AdapterHubError
from adapterhub_lite.core.spec import spec_from_dict
from adapterhub_lite.model.evaluate import evaluate_split
from adapterhub_lite.ops.interference import _flags, interference
from adapterhub_lite.training.recipes.joint import train_joint
from adapterhub_lite.training.recipes.joint_config import JointConfig

from .conftest import train_tiny


def test_flags_follow_their_definitions():
    scores = {"a": {"base": 0.5, "a": 0.9, "b": 0.4, "merged:ties": 0.85, "joint:r": 0.95},
              "b": {"base": 0.6, "a": 0.6, "b": 0.8, "merged:ties": 0.8, "joint:r": None}}
    flags = _flags(scores, {"joint:r": {}}, 0.01, {"a": 100, "b": 100})
    assert {(f["task"], f["adapter"], f["kind"]) for f in flags} == {
        ("a", "b", "interference"), ("a", "merged:ties", "negative_transfer"), ("a", "joint:r", "positive_transfer")}
    ties = next(f for f in flags if f["adapter"] == "merged:ties")  # 0.85 vs 0.9 over 100 rows each
    assert ties["z"] == pytest.approx(-0.05 / ((0.85 * 0.15 + 0.9 * 0.1) / 100) ** 0.5, abs=0.01)


def test_report_scores_every_task_under_every_adapter(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    singles = [train_tiny(tmp_path, n, method_args={"r": 4, "target_modules": ["q_proj", "v_proj"]}, train={"max_steps": 2, "seed": i})
               for i, n in enumerate(("one", "two"))]
    specs = [spec_from_dict(json.loads((f / "adapterhub.json").read_text())["task"]) for f in singles]
    run = train_joint(specs, tmp_path / "mtl", JointConfig(max_steps=2, batch_size=4, warmup_steps=0, eval_every=2, eval_samples=4),
                      progress=False)
    report = interference([*singles, run], tmp_path / "report", merges=("linear",), rows=8)
    assert report["columns"] == ["base", "one", "two", "merged:linear", "joint:mtl"]
    assert set(report["scores"]) == {"one", "two"} and all(len(r) == 5 for r in report["scores"].values())
    model, backbone, spec, _ = load_adapter(singles[0])
    own, _, _ = evaluate_split(model, backbone.tokenizer, spec, load_task_data(spec, ("dev",))["dev"], limit=8)
    assert report["scores"]["one"]["one"] == pytest.approx(own["accuracy"])
    assert (tmp_path / "report" / "heatmap.png").stat().st_size > 1000
    assert json.loads((tmp_path / "report" / "report.json").read_text())["flags"] == report["flags"]


def test_report_needs_a_task_adapter(tmp_path):
    with pytest.raises(AdapterHubError, match="not an adapter folder"):
        interference([tmp_path], tmp_path / "r")
