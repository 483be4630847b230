"""Interference report: task × adapter matrix, negative transfer flagged, JSON + heatmap."""

import json
import os

import pytest
import torch

from adapterhub_lite.artifacts.loading import load_adapter
from adapterhub_lite.core.data import load_task_data
from adapterhub_lite.core.errors import AdapterHubError
from adapterhub_lite.core.spec import spec_from_dict
from adapterhub_lite.model.evaluate import evaluate_split
from adapterhub_lite.ops import interference as ops
from adapterhub_lite.ops.interference import _flags, interference
from adapterhub_lite.training.joint_config import JointConfig
from adapterhub_lite.training.recipes.joint import train_joint

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


STALLED_SWAP = """
import os, sys, time, pathlib
from adapterhub_lite.ops.interference import interference
adapter, out, marker = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
rename = os.rename
def stalling(src, dst, *args, **kwargs):  # the previous report has just been moved aside: stall before the new one goes in
    rename(src, dst, *args, **kwargs)
    if pathlib.Path(src) == out:
        marker.write_text("stalled")
        time.sleep(600)
os.rename = stalling
interference([adapter], out, merges=(), rows=2)
"""


def test_a_run_killed_between_the_two_renames_leaves_the_previous_report_which_the_next_run_puts_back(tmp_path):
    """A report over a previous one moves the old folder aside, then renames the new one in: a run SIGKILLed between
    left no report in place and the old one hidden beside it (.r.replaced-…), where the next run deleted it, and a
    run refused or failing meanwhile left it hidden. The next run now puts it back first, even one that is then
    refused; an aside whose run did land its report (killed while removing it) is removed; a live run's is left."""
    from adapterhub_lite.artifacts import files

    from .test_registry import kill_at_stall
    from .test_registry_writes import _dead_pid

    (tmp_path / "one").mkdir()
    one = train_tiny(tmp_path / "one", "toy")
    out, marker = tmp_path / "r", tmp_path / "stalled"
    interference([one], out, merges=(), rows=2)
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    kill_at_stall([STALLED_SWAP, str(one), str(out), str(marker)], marker)
    assert not out.exists() and len(list(tmp_path.glob(".r.replaced-*"))) == 1
    with pytest.raises(AdapterHubError, match="--tolerance must be"):
        interference([one], out, merges=(), rows=2, tolerance=-1)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old  # the previous report, whole, in its place
    assert not list(tmp_path.glob(".r.replaced-*"))

    landed = tmp_path / f".r.replaced-aaaa0001-{_dead_pid()}-{files.host()}"  # its run renamed the new report in, then died
    live = tmp_path / f".r.replaced-aaaa0002-{os.getpid()}-{files.host()}"  # another run, between its renames now
    for aside in (landed, live):
        aside.mkdir()
        (aside / "report.json").write_text("{}")
    interference([one], out, merges=(), rows=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["one", "r", "stalled", live.name])  # the killed run's temp too is cleared
    assert {p.name for p in out.iterdir()} == ops.REPORT_FILES


@pytest.mark.parametrize("target", ["a report folder", "nothing"])
def test_a_symlinked_output_is_refused_as_pull_and_merge_refuse_it(tmp_path, capsys, target):
    """A symlink --output was written through (the linked folder's report replaced, or a dangling link's target
    created), where pull, merge and train --overwrite refuse a link: refused now, in one line, before anything loads,
    the link and what it names left as they were."""
    from adapterhub_lite.cli import main

    (tmp_path / "one").mkdir()
    one = train_tiny(tmp_path / "one", "toy")
    real = tmp_path / "real"
    if target == "a report folder":
        interference([one], real, merges=(), rows=2)
    (tmp_path / "link").symlink_to(real)
    before = {str(p): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    capsys.readouterr()  # training's and the first report's output
    assert main(["interference", str(one), "--output", str(tmp_path / "link"), "--merge", "--rows", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: --output '{tmp_path}/link' is a symlink (to '{real}'); interference replaces its --output as a whole "
                   "and does not write through or replace a link: give the folder itself or a new one"), err
    assert (tmp_path / "link").is_symlink() and real.exists() == (target == "a report folder")
    assert {str(p): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert not list(tmp_path.glob(".*"))
