"""Every bad input gives one line on stderr, exit code 2, and writes nothing."""

import json

import pytest
import yaml

from adapterhub_lite.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(capsys, task_dir, argv, needle):
    before = sorted(p.name for p in task_dir.iterdir())
    code, _, err = run(capsys, *argv)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], err
    assert "\n" not in lines[0]
    assert sorted(p.name for p in task_dir.iterdir()) == before  # nothing written, not even a partial folder


@pytest.mark.parametrize("override, needle", [
    (["base=no-such-model"], "unknown backbone 'no-such-model'"),
    (["base=./missing_dir/"], "unknown backbone"),
    (["data.train=missing.jsonl"], "data file 'missing.jsonl' does not exist"),
    (["data.train=before"], "data file 'before' is a directory, not a file"),  # not "does not exist": it is there
    (["prompt=Text: {body}\nLabel:"], "has no column 'body'"),
    (["labels={pos: x}"], "'labels' needs at least two verbalizer words"),
    (["labels={pos: x, other: z}"], "label value(s) 'neg' not in labels"),
    (["data.dev=empty.jsonl"], "is empty"),
    (["train.num_epochs=3", "method=adapterfusion"], "unknown key 'train.num_epochs'"),
    (["method_args.target_modules=[c_attn]"], "cannot target ['c_attn'] on 'llama'"),
    (["method=prefix", "method_args.r=4"], "method_args for 'prefix' are invalid"),
    (["labels={pos: xy, neg: xy}"], "labels['pos'] and labels['neg'] are one word 'xy'"),  # train alone refused it (tokenized)
])
def test_bad_train_input_is_refused(capsys, cls_task, override, needle):
    (cls_task / "empty.jsonl").write_text("")
    (cls_task / "before").mkdir()  # so that "nothing written" compares a non-trivial listing
    assert_refused(capsys, cls_task, ["train", "toy.yaml", *override, "--output", "out"], needle)


def test_all_spec_problems_come_in_one_line(capsys, cls_task):
    code, _, err = run(capsys, "train", "toy.yaml", "train.num_epochs=3", "method=adapterfusion", "type=regression")
    assert code == 2 and err.count("error:") == 1
    assert "train.num_epochs" in err and "adapterfusion" in err and "regression" in err


def test_existing_output_folder_is_refused(capsys, cls_task):
    (cls_task / "out").mkdir()
    (cls_task / "out" / "keep.txt").write_text("mine")
    assert_refused(capsys, cls_task, ["train", "toy.yaml", "--output", "out"], "already exists; pass --overwrite")
    assert (cls_task / "out" / "keep.txt").read_text() == "mine"


def test_resume_without_checkpoint_is_refused(capsys, cls_task):
    assert_refused(capsys, cls_task, ["train", "toy.yaml", "--output", "out", "--resume"], "does not exist; run without --resume")


def test_resume_of_a_finished_run_says_so_and_names_a_fix_that_works(capsys, cls_task):
    """README's `train scripts/tasks/sst2.yaml --resume` after that run finished said 'run without --resume to start
    fresh', and that run was refused in turn ('already exists'): the refusal names the finished folder and --overwrite."""
    (cls_task / "out").mkdir()
    (cls_task / "out" / "adapterhub.json").write_text("{}")
    assert_refused(capsys, cls_task, ["train", "toy.yaml", "--output", "out", "--resume"],
                   "'out' already exists and .out.partial holds no checkpoint (a finished run): nothing to resume; "
                   "train it again with --overwrite (without --resume)")


@pytest.mark.parametrize("command", ["train", "compose-fit"])
def test_a_missing_spec_is_named_alone_not_the_optional_overrides(capsys, command):
    """argparse lists a `nargs="*"` positional without a default as required: `train` alone said
    "required: spec, overrides", though overrides are optional."""
    with pytest.raises(SystemExit) as ended:
        main([command])
    err = capsys.readouterr().err
    assert ended.value.code == 2 and "required:" in err and "overrides" not in err.split("required:")[1].split(";")[0], err


def test_missing_spec_file_and_bad_yaml(capsys, cls_task):
    assert_refused(capsys, cls_task, ["train", "nope.yaml"], "does not exist")
    (cls_task / "tasks.yaml").mkdir()  # a folder is there: "does not exist" sent the user looking for it
    assert_refused(capsys, cls_task, ["train", "tasks.yaml"], "'tasks.yaml' is a directory, not a file; pass a task YAML")
    (cls_task / "latin1.yaml").write_bytes((cls_task / "toy.yaml").read_bytes() + b"# caf\xe9\n")  # a traceback (UnicodeDecodeError)
    lines = (cls_task / "toy.yaml").read_text().count("\n") + 1
    assert_refused(capsys, cls_task, ["train", "latin1.yaml"], f"latin1.yaml:{lines} is not UTF-8 (byte 0xe9")
    (cls_task / "bad.yaml").write_text("name: [")
    assert_refused(capsys, cls_task, ["train", "bad.yaml"], "YAML does not parse")


def test_train_eval_predict_round_trip(capsys, cls_task):
    code, out, _ = run(capsys, "train", "toy.yaml", "train.max_steps=2", "--output", "out", "--no-progress")
    assert code == 0 and json.loads(out)["output"] == "out"
    code, out, _ = run(capsys, "eval", "out", "--split", "dev", "--json")
    assert code == 0 and json.loads(out)["rows"] == 16
    code, _, err = run(capsys, "eval", "out", "--split", "test")  # a split name the spec does not have, not a file either
    assert code == 2 and "--split 'test' is neither dev nor train nor a data file that exists" in err and len(err.strip().splitlines()) == 1, err
    assert ".json / .parquet file" in err  # every format a split may be read from
    with pytest.MonkeyPatch.context() as m:  # a bad --split is refused before the backbone loads (its bar would sit above the line)
        m.setattr("adapterhub_lite.artifacts.loading.load_adapter", lambda *a, **k: pytest.fail("the backbone loaded before the --split refusal"))
        code, _, err = run(capsys, "eval", "out", "--split", "missing.jsonl")
    assert code == 2 and "--split 'missing.jsonl' is neither" in err, err
    # eval's score must be the score of what predict answers on the same rows, class by class; the
    # classes are uneven (12 / 4) so that swapped labels or a constant answer cannot score the same
    dev = [{"text": f"{'aaaa' if i < 12 else 'bbbb'} {i}", "label": "pos" if i < 12 else "neg"} for i in range(16)]
    (cls_task / "uneven.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dev))
    code, out, _ = run(capsys, "eval", "out", "--split", "uneven.jsonl", "--json")
    result = json.loads(out)
    code2, out, _ = run(capsys, "predict", "out", "--input", "uneven.jsonl")
    words = [json.loads(line)["prediction"] for line in out.splitlines()]
    gold = [{"pos": "x", "neg": "z"}[r["label"]] for r in dev]
    assert code == code2 == 0 and result["rows"] == len(words) == 16
    assert result["accuracy"] == round(sum(w == g for w, g in zip(words, gold)) / 16, 4)
    assert {k: v["support"] for k, v in result["per_class"].items()} == {"x": gold.count("x"), "z": gold.count("z")}
    assert {k: v["recall"] for k, v in result["per_class"].items()} == {
        c: round(sum(w == g == c for w, g in zip(words, gold)) / gold.count(c), 4) for c in ("x", "z")}
    code, out, _ = run(capsys, "predict", "out", "--text", "aaaa 1")
    assert code == 0 and json.loads(out)["prediction"] in ("x", "z")
    (cls_task / "in.jsonl").write_text('{"text": "aaaa 2"}\n{"text": "bbbb 2"}\n')
    code, _, _ = run(capsys, "predict", "out", "--input", "in.jsonl", "--output", "preds.jsonl")
    preds = [json.loads(line) for line in (cls_task / "preds.jsonl").read_text().splitlines()]
    assert code == 0 and [p["text"] for p in preds] == ["aaaa 2", "bbbb 2"]


def test_predict_refuses_bad_input(capsys, cls_task):
    run(capsys, "train", "toy.yaml", "train.max_steps=1", "--output", "out", "--no-progress")
    assert_refused(capsys, cls_task, ["predict", "out"], "exactly one of --text")
    (cls_task / "in.jsonl").write_text('{"body": "x"}\n')
    assert_refused(capsys, cls_task, ["predict", "out", "--input", "in.jsonl"], "lack key(s) ['text']")
    assert_refused(capsys, cls_task, ["eval", "nowhere"], "adapter folder 'nowhere' does not exist")


def test_wrong_backbone_is_refused_with_both_fingerprints(capsys, cls_task):
    run(capsys, "train", "toy.yaml", "train.max_steps=1", "--output", "out", "--no-progress")
    meta = json.loads((cls_task / "out" / "adapterhub.json").read_text())
    meta["base"]["fingerprint"].update(weights_sha256="0" * 64, id="feedfacefeedface")
    (cls_task / "out" / "adapterhub.json").write_text(json.dumps(meta))
    code, _, err = run(capsys, "eval", "out")
    assert code == 2 and "feedfacefeedface" in err and "--allow-base-mismatch" in err
    code, _, _ = run(capsys, "eval", "out", "--allow-base-mismatch", "--json")
    assert code == 0


def test_spec_yaml_is_the_documented_shape(cls_task):
    spec = yaml.safe_load((cls_task / "toy.yaml").read_text())
    assert {"name", "type", "data", "prompt", "label", "labels", "metric", "method", "train", "base", "quantization"} <= set(spec)


def test_every_registry_command_that_reads_can_print_json(tmp_path, capsys):
    """One grammar: --json on list, info, verify and pull gives one JSON object (or list) on stdout."""
    import shutil as sh

    from adapterhub_lite.cli import main

    reg = tmp_path / "reg"
    sh.copytree("adapters", reg)
    for argv in (["list"], ["info", "sst2"], ["verify"], ["pull", "sst2", "--to", str(tmp_path / "out")]):
        assert main([*argv, "--registry", str(reg), "--json"]) == 0, argv
        json.loads(capsys.readouterr().out)
    # a name that is not there is a user's mistake: one line, exit 2 (exit 1 stays a failed check of what is there)
    for argv, said in ((["verify", "nosuch"], "no adapter 'nosuch' in registry"), (["verify", "sst2@1.0.0"], "give 'sst2'")):
        assert main([*argv, "--registry", str(reg)]) == 2, argv
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1, err


def test_a_reader_that_leaves_ends_the_command_quietly(capsys, monkeypatch):
    """`adapterhub-lite list | head -3`: the pipe closes under the writer, which stops with exit 0 and no traceback
    (the output is what the reader wanted; stdout is pointed at /dev/null so the final flush cannot fail again)."""
    import sys

    registry_cli = sys.modules["adapterhub_lite.cli.registry"]  # where `list` is (the parser reads _list from it)

    def leave(_args):
        raise BrokenPipeError(32, "Broken pipe")
    monkeypatch.setattr(registry_cli, "_list", leave)
    assert main(["list", "--registry", "nowhere"]) == 0
    assert capsys.readouterr().err == ""


def test_eval_of_a_hub_split_says_when_the_dataset_changed_since_training(capsys, cls_task, monkeypatch):
    """The same check for an `hf:` split: its content hash is the datasets fingerprint (the Hub revision's), recorded at
    training; `eval` compared it only for local files, so a dataset changed on the Hub since was scored as the adapter's own
    split without a word. load_dataset is stood in for (no network): one fingerprint at training, another at eval."""
    import datasets

    rows = [json.loads(line) for line in (cls_task / "dev.jsonl").read_text().splitlines()]
    fingerprint = {"now": "a" * 16}

    def load_dataset(name, config=None, split=None):
        ds = datasets.Dataset.from_list(rows)
        ds._fingerprint = fingerprint["now"]
        return ds

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    code, _, _ = run(capsys, "train", "toy.yaml", "train.max_steps=2", "data.dev=hf:toy:dev", "--output", "out", "--no-progress")
    assert code == 0
    code, _, err = run(capsys, "eval", "out", "--json")
    assert code == 0 and "fingerprint" not in err, err  # the dataset it trained with: no warning
    fingerprint["now"] = "b" * 16
    code, out, err = run(capsys, "eval", "out", "--json")
    warned = [line for line in err.splitlines() if line.startswith("warning:") and "hf:toy:dev" in line and "fingerprint" in line]
    assert code == 0 and json.loads(out)["rows"] == len(rows) and len(warned) == 1, err
    assert "aaaaaaaaaaaa recorded, bbbbbbbbbbbb read" in warned[0]


def test_eval_of_the_recorded_split_says_when_it_reads_another_file(capsys, cls_task, tmp_path_factory, monkeypatch):
    """`eval FOLDER` reads the split its spec records (data.dev: 'dev.jsonl'), relative to the current directory. From
    another directory holding another dev.jsonl it scored that file silently, as 'split: dev' (6 rows of another task,
    accuracy 1.0, no word); from one without it, the fix named was "fix data.train / data.dev in the spec", which eval
    has no spec to fix. Now: a warning naming both sha256 (the recorded and the read), and the missing file's fix is
    --split PATH or the directory it was trained in."""
    code, _, _ = run(capsys, "train", "toy.yaml", "train.max_steps=2", "--output", "out", "--no-progress")
    assert code == 0
    folder = str(cls_task / "out")
    other = tmp_path_factory.mktemp("elsewhere")
    monkeypatch.chdir(other)
    code, _, err = run(capsys, "eval", folder, "--json")
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "--split" in lines[0] and "data.train / data.dev in the spec" not in lines[0], err
    (other / "dev.jsonl").write_text((cls_task / "dev.jsonl").read_text().splitlines()[0] + "\n")
    code, out, err = run(capsys, "eval", folder, "--json")
    assert code == 0 and json.loads(out)["rows"] == 1
    warned = [line for line in err.splitlines() if line.startswith("warning:") and "dev.jsonl" in line and "sha256" in line]
    assert len(warned) == 1, err
    monkeypatch.chdir(cls_task)  # the file it was trained on: no warning
    code, _, err = run(capsys, "eval", folder, "--json")
    assert code == 0 and "sha256" not in err, err
