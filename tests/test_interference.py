"""Interference report: task × adapter matrix, negative transfer flagged, JSON + heatmap."""

import json

import pytest
import torch

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


def test_two_adapters_of_one_task_are_refused_not_one_left_out(tmp_path):
    """Two adapters of one task (two runs of it) were keyed by task name: the report held the last one's column alone, exit 0."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one, two = train_tiny(tmp_path / "one", "toy"), train_tiny(tmp_path / "two", "toy")
    with pytest.raises(AdapterHubError, match="are both adapters of task 'toy'"):
        interference([one, two], tmp_path / "r", merges=())
    assert not (tmp_path / "r").exists()


def test_the_output_is_refused_before_scoring_and_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """An --output under a file came out as mkdir's traceback after every cell was scored; a folder holding other files
    (an adapter) got report.json written into it; and report.json was written before heatmap.png, so a run that
    failed or was killed in between left a report without its heatmap."""
    import adapterhub_lite.ops.interference as ops

    (tmp_path / "one").mkdir()
    one = train_tiny(tmp_path / "one", "toy")
    (tmp_path / "file").write_text("x")
    with pytest.raises(AdapterHubError, match="is a file, not a folder"):
        interference([one], tmp_path / "file" / "r", merges=())
    with pytest.raises(AdapterHubError, match="exists and is not a report folder"):
        interference([one], one, merges=())
    assert not (one / "report.json").exists()

    def broken(report, path):
        raise OSError("disk full")

    monkeypatch.setattr(ops, "heatmap", broken)
    with pytest.raises(AdapterHubError, match="cannot write the report to --output .*: disk full"):
        interference([one], tmp_path / "r", merges=(), rows=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "one"]  # no report, no hidden work folder
    monkeypatch.undo()
    interference([one], tmp_path / "r", merges=(), rows=2)
    interference([one], tmp_path / "r", merges=(), rows=2)  # a previous report is replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "one", "r"]
    assert {p.name for p in (tmp_path / "r").iterdir()} == ops.REPORT_FILES


def test_adapters_of_two_methods_and_a_negative_tolerance_are_refused_before_loading(tmp_path):
    """A LoRA and a prefix adapter: peft's load_adapter raised 'Cannot combine adapters with different peft types' (a
    traceback, exit 1); --tolerance -1 flagged every cell (|Δ| > -1), exit 0."""
    (tmp_path / "l").mkdir()
    (tmp_path / "p").mkdir()
    lora, prefix = train_tiny(tmp_path / "l", "one"), train_tiny(tmp_path / "p", "two", method="prefix")
    with pytest.raises(AdapterHubError, match="different methods .one: lora, two: prefix"):
        interference([lora, prefix], tmp_path / "r", merges=())
    with pytest.raises(AdapterHubError, match="--tolerance must be a score difference ≥ 0, got -1"):
        interference([lora], tmp_path / "r", merges=(), tolerance=-1)
    assert not (tmp_path / "r").exists()


def test_a_dare_column_is_the_merge_of_its_seed_in_every_run(tmp_path, monkeypatch):
    """The merged:dare_* columns merged the report's loaded adapters with DARE's drops drawn from wherever torch's
    generator stood: two runs scored two adapters, neither the one `adapterhub-lite merge --seed 0` writes. They are
    merge_adapters' own seeded build now: the same factors in every run, equal to that merge's, and the seed is recorded."""
    from safetensors.torch import load_file

    from adapterhub_lite.ops import interference as module
    from adapterhub_lite.ops.merge import merge_adapters

    monkeypatch.chdir(tmp_path)
    singles = {n: train_tiny(tmp_path, n, method_args={"r": 4, "target_modules": ["q_proj", "v_proj"]}, train={"max_steps": 2, "seed": i})
               for i, n in enumerate(("one", "two"))}
    seen, score = [], module._score

    def scored(model, tok, spec, dev, adapter, rows):  # the merged column's factors, as scored
        if adapter == "merged:dare_linear" and spec.name == "one":
            seen.append({k: v.detach().cpu().clone() for k, v in model.named_parameters() if ".merged:dare_linear." in k})
        return score(model, tok, spec, dev, adapter, rows)
    monkeypatch.setattr(module, "_score", scored)
    reports = [interference(list(singles.values()), tmp_path / f"report{i}", merges=("dare_linear",), density=0.5, rows=4) for i in range(2)]
    # which adapters the column merged, at which weights (the report said method, density and seed alone)
    assert reports[0]["merges"] == {"merged:dare_linear": {"method": "dare_linear", "density": 0.5, "seed": 0, "weights": {"one": 0.5, "two": 0.5}}}
    assert len(seen) == 2 and seen[0].keys() and all(torch.equal(seen[0][k], seen[1][k]) for k in seen[0])
    assert reports[0]["scores"] == reports[1]["scores"]
    # what `adapterhub-lite merge --seed 0` writes (equal weights, on the CPU backbone)
    merge_adapters(singles, {"one": 0.5, "two": 0.5}, "dare_linear", density=0.5, name="m", output=tmp_path / "cli", task="none", report_rows=0, seed=0)
    cli = load_file(tmp_path / "cli" / "adapter_model.safetensors")
    got = {k.replace(".merged:dare_linear", ""): v for k, v in seen[0].items()}
    assert cli.keys() == got.keys() and all(torch.equal(cli[k].float(), got[k].float()) for k in cli)


def test_a_report_replacing_another_is_never_seen_as_one_file_of_each(tmp_path, monkeypatch):
    """A second report over a first replaced report.json, then heatmap.png: a run killed between left the new
    report.json beside the old heatmap. Every rename a run makes is watched here: after each, the folder holds the
    old pair, the new pair, or nothing, and in the end the new pair alone (no hidden folder left)."""
    import os

    from adapterhub_lite.ops import interference as ops

    out = tmp_path / "r"

    def report(score):
        return {"tasks": ["toy"], "columns": ["base"], "metric": {"toy": "accuracy"}, "scores": {"toy": {"base": score}}, "flags": []}

    def seen():
        return tuple((out / n).read_bytes() if (out / n).exists() else None for n in sorted(ops.REPORT_FILES))

    ops._save(report(0.25), out)
    old = seen()
    states = []
    for name in ("rename", "replace"):
        real = getattr(os, name)

        def watched(src, dst, *args, _real=real, **kwargs):
            _real(src, dst, *args, **kwargs)
            states.append(seen())
        monkeypatch.setattr(os, name, watched)
    ops._save(report(0.75), out)
    new = seen()
    assert None not in old + new and old[0] != new[0] and old[1] != new[1]  # both files differ between the two reports
    labels = [tuple("none" if b is None else "old" if b == old[i] else "new" if b == new[i] else "other" for i, b in enumerate(st))
              for st in states]  # (heatmap.png, report.json) after each rename
    assert labels and set(labels) <= {("old", "old"), ("new", "new"), ("none", "none")}, labels
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]
