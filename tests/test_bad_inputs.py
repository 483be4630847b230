"""The CLI driven with bad inputs (issue 10): one `error:` line on stderr, a non-zero exit, no stray files."""

import json
import os

import pytest
import yaml

from adapterhub_lite.cli import build_parser, main


def listing(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files + [""])


def refused(capsys, root, argv, needle):
    before = listing(root)
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse-level mistakes exit from inside the parser
        code = exc.code
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code not in (0, None), err
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err
    assert listing(root) == before  # nothing written, not even a partial folder or a temp file


@pytest.mark.parametrize("override, needle", [
    (["train.lr=.inf"], "train.lr=inf is not a finite number"),
    (["train.weight_decay=nan"], "train.weight_decay='nan' is not a finite number"),
    (["method_args.r=eight"], "method_args.r='eight' must be a whole number ≥ 1"),
    (["method_args.r=0"], "(an adapter needs at least one rank)"),
    (["prompt=Text: {text!r:>{width}}\nLabel:"], "prompt field {text!r:>{width}} has a conversion or format spec"),
    (["train.max_length=1"], "use train.max_length ≥ 2"),
    (["data.train=ragged.tsv"], "ragged.tsv:3 has 1 fields but the header has 2"),
    (["data.train=header.csv"], "header.csv has a header (text, label) but no rows"),
    (["data.train=latin1.jsonl"], "latin1.jsonl:1 is not UTF-8"),
    (["labels=['1', '2']", "data.train=digits.csv", "data.dev=digits.csv"], "which is both the label word of class 0 and the index of class 1"),
])
def test_bad_train_inputs(capsys, cls_task, override, needle):
    (cls_task / "ragged.tsv").write_text("text\tlabel\naaaa\tpos\nbbbb\n")
    (cls_task / "header.csv").write_text("text,label\n")
    (cls_task / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9", "label": "pos"}\n')
    (cls_task / "digits.csv").write_text("text,label\naaaa,1\nbbbb,2\n")
    refused(capsys, cls_task, ["train", "toy.yaml", *override, "--output", "out", "--no-progress"], needle)


@pytest.mark.parametrize("argv, needle", [
    (["merge", "a", "b", "--weights", "nan", "0.5", "--output", "m"], "argument --weights: 'nan' is not a finite number"),
    (["merge", "a", "b", "--weights", "1", "inf", "--output", "m"], "'inf' is not a finite number"),
    (["interference", "a", "--output", "r", "--rows", "-5"], "argument --rows: -5 must be ≥ 0"),
    (["train-multi", "toy.yaml", "--output", "r", "train.max_steps=0"], "train.max_steps must be ≥ 1, got 0"),
    (["train-multi", "toy.yaml", "train.max_steps=0", "--output", "r"], "train.max_steps must be ≥ 1, got 0"),
    (["infer", "--input", "null.jsonl", "--registry", "reg"], "null.jsonl: request(s) on line(s) [3] have a 'text' that is null, not a string"),
    (["serve", "--registry", "reg", "--port", "99999"], "argument --port: '99999' is not a port: give a number from 0 to 65535"),
    # values that cannot work, and flags that would be unread, are refused before anything loads
    (["serve", "--registry", "reg", "--replicas", "3", "--ray-address", "auto"], "--replicas, --ray-address configure Ray Serve replicas; add --ray"),
    (["serve", "--registry", "reg", "--request-timeout", "-1"], "argument --request-timeout: -1 must be above 0"),
    (["serve", "--registry", "reg", "--memory-budget-mb", "-1"], "argument --memory-budget-mb: -1 must be above 0"),
    (["serve", "--registry", "reg", "--kv-cache-mb", "-1"], "argument --kv-cache-mb: -1 must be above 0"),
    (["serve", "--registry", "reg", "--max-input-tokens", "600", "--max-model-len", "100"], "--max-input-tokens 600 is past the context, --max-model-len 100"),
    (["infer", "--input", "null.jsonl", "--registry", "reg", "--memory-budget-mb", "-5"], "argument --memory-budget-mb: -5 must be above 0"),
    # one grammar: every command that reads a spec takes key=value overrides, before or after the flags
    (["compose-fit", "toy.yaml", "train.max_steps=0", "--from", "a", "b", "--output", "o"], "train.max_steps must be ≥ 1, got 0"),
    (["compose-fit", "toy.yaml", "--from", "a", "b", "--output", "o", "train.max_steps=0"], "train.max_steps must be ≥ 1, got 0"),
    # the joint run's schedule is one: specs that disagree are refused with every key and value, and the fix
    (["train-multi", "toy.yaml", "other.yaml", "--output", "r"], "train.max_steps differs between the tasks (toy: 6, other: 9); a joint run has one: pass train.max_steps=VALUE"),
])
def test_bad_flags(capsys, cls_task, argv, needle):
    (cls_task / "null.jsonl").write_text('{"adapter": "base", "text": "ok"}\n\n{"adapter": "base", "text": null}\n')  # line 3, row 2
    other = yaml.safe_load((cls_task / "toy.yaml").read_text())
    (cls_task / "other.yaml").write_text(yaml.safe_dump({**other, "name": "other", "train": {**other["train"], "max_steps": 9}}))
    refused(capsys, cls_task, argv, needle)


def test_every_adapter_loading_command_takes_the_same_flags():
    parser = build_parser()
    common = {"--allow-base-mismatch", "--device", "--dtype", "--quantization"}
    for command in ("eval", "predict", "infer", "merge", "interference", "compose-fit"):
        flags = {o for a in parser._subparsers._group_actions[0].choices[command]._actions for o in a.option_strings}
        assert common <= flags, (command, common - flags)
    args = parser.parse_args(["infer", "--input", "x.jsonl", "--allow-base-mismatch"])  # its own error message says to pass it
    assert args.allow_base_mismatch


def test_bad_predict_inputs(capsys, cls_task):
    assert main(["train", "toy.yaml", "train.max_steps=1", "--output", "out", "--no-progress"]) == 0
    capsys.readouterr()
    (cls_task / "null.jsonl").write_text('{"text": "aaaa 1"}\n{"text": null}\n')
    refused(capsys, cls_task, ["predict", "out", "--input", "null.jsonl", "--output", "p.jsonl"], "null.jsonl:2: an input row has null for 'text'")
    (cls_task / "gap.jsonl").write_text('{"text": "aaaa 1", "id": 7}\n\n{"body": "aaaa 2"}\n')  # the file and its line, not the row's index
    refused(capsys, cls_task, ["predict", "out", "--input", "gap.jsonl", "--output", "p.jsonl"], "gap.jsonl:3: input rows lack key(s) ['text']")
    (cls_task / "taken").mkdir()
    refused(capsys, cls_task, ["predict", "out", "--input", "taken"], "input file 'taken' is a directory, not a file")
    refused(capsys, cls_task, ["predict", "out", "--text", "aaaa 1", "--output", "taken"], "--output 'taken' is a folder")
    refused(capsys, cls_task, ["predict", "out", "--text", "aaaa 1", "--output", "nowhere/p.jsonl"], "folder 'nowhere' does not exist")
    (cls_task / "plain.txt").write_text("x")  # under a file: 'does not exist' sent the user to create what is there
    refused(capsys, cls_task, ["predict", "out", "--text", "aaaa 1", "--output", "plain.txt/p.jsonl"], "'plain.txt' is a file, not a folder")
    pickle_only = cls_task / "pickled"
    pickle_only.mkdir()
    for name in ("adapter_config.json", "adapterhub.json"):
        (pickle_only / name).write_bytes((cls_task / "out" / name).read_bytes())
    (pickle_only / "adapter_model.bin").write_bytes(b"not loaded")
    for command in ("predict", "eval"):
        argv = [command, "pickled"] + (["--text", "aaaa 1"] if command == "predict" else [])
        refused(capsys, cls_task, argv, "holds only adapter_model.bin")
    _, err = capsys.readouterr()
    assert main(["predict", "pickled", "--text", "x"]) == 2 and "adapterhub-lite convert pickled --trust-pickle" in capsys.readouterr().err
    assert main(["predict", "out", "--text", "aaaa 1", "--output", "p.jsonl"]) == 0  # the good path still writes
    assert json.loads((cls_task / "p.jsonl").read_text())["prediction"] in ("x", "z")


def test_a_second_train_into_the_same_output_is_refused(capsys, cls_task):
    """Another run holds the output's lock: refused in one line before anything loads, nothing touched."""
    from filelock import FileLock

    held = FileLock(str(cls_task / ".out.lock"))
    with held:
        refused(capsys, cls_task, ["train", "toy.yaml", "--output", "out", "--no-progress"],
                "output 'out' is being written by another run right now")
    # the lock goes with the run that held it: a run after it trains, and leaves no lock file behind
    assert main(["train", "toy.yaml", "train.max_steps=1", "--output", "out", "--no-progress"]) == 0
    assert not (cls_task / ".out.lock").exists() and (cls_task / "out" / "adapterhub.json").is_file()


def test_a_lock_file_that_cannot_be_made_is_not_blamed_on_another_run(capsys, cls_task):
    """filelock reports a lock file it cannot open as held (say /proc, or a folder in its place): the refusal names
    what the OS said, not a run that does not exist."""
    (cls_task / ".out.lock").mkdir()
    refused(capsys, cls_task, ["train", "toy.yaml", "--output", "out", "--no-progress"],
            "--output 'out' cannot be written: its lock file cannot be created (Is a directory (EISDIR)")
    assert not (cls_task / "out").exists()


def test_an_output_whose_parent_cannot_be_made_is_one_line(capsys, cls_task, monkeypatch):
    """A parent path the OS refuses is refused in one line naming the OS's reason, before anything loads: a component
    over 255 bytes (stat says ENAMETOOLONG), or a folder mkdir cannot create though os.access said the ancestor is
    writable (root under /proc, a full disk). Each came out as a traceback, exit 1."""
    refused(capsys, cls_task, ["train", "toy.yaml", "--output", "a" * 300 + "/out", "--no-progress"],
            "cannot be written: File name too long (ENAMETOOLONG)")

    from pathlib import Path

    def no_space(self, *args, **kwargs):
        raise OSError(28, "No space left on device", str(self))

    monkeypatch.setattr(Path, "mkdir", no_space)
    refused(capsys, cls_task, ["train", "toy.yaml", "--output", "new/out", "--no-progress"],
            "folder 'new' cannot be created (No space left on device (ENOSPC)")


def test_data_parallel_ranks_do_not_lock_each_other_out(capsys, cls_task, monkeypatch):
    """Only rank 0 of a torchrun job writes, so only it takes the lock: rank 1 of the same run is not refused."""
    from filelock import FileLock

    from adapterhub_lite.training.output import claim_output

    with FileLock(str(cls_task / ".out.lock")):  # rank 0 of the same run holds it
        monkeypatch.setenv("RANK", "1")
        with claim_output(cls_task / "out", overwrite=False, resume=False) as work:
            assert work == cls_task / ".out.partial"


def test_a_fresh_train_keeps_an_interrupted_checkpoint(capsys, cls_task, monkeypatch):
    """A fresh run (no --resume) into an output holding an interrupted run's checkpoint is refused with its step;
    --overwrite discards it and starts over; and the --resume refusal's advice (--overwrite) works."""
    from adapterhub_lite.training.recipes import train as train_mod

    real_save, saves = train_mod.Checkpoint.save, []

    def dies_on_second(self, payload):
        saves.append(payload["state"]["step"])
        if len(saves) == 2:
            raise KeyboardInterrupt  # the run is killed after its first checkpoint
        real_save(self, payload)

    monkeypatch.setattr(train_mod.Checkpoint, "save", dies_on_second)
    argv = ["train", "toy.yaml", "train.max_steps=4", "train.eval_every=2", "--output", "out", "--no-progress"]
    assert main(argv) != 0
    monkeypatch.setattr(train_mod.Checkpoint, "save", real_save)
    capsys.readouterr()
    ckpt = cls_task / ".out.partial" / "checkpoint" / "state.pt"
    assert ckpt.is_file()
    stamp = ckpt.stat().st_mtime_ns
    refused(capsys, cls_task, argv, f"holds an interrupted run at step {saves[0]} for 'out'; rerun with --resume to continue it, "
                                    "or with --overwrite to discard it and start over")
    assert ckpt.stat().st_mtime_ns == stamp
    # a checkpoint --resume cannot use says to start over with --overwrite: that advice now works
    ckpt.write_bytes(b"cut")
    refused(capsys, cls_task, argv, "(its step is unreadable)")
    assert main(argv + ["--resume"]) == 2 and "run with --overwrite instead of --resume" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0
    assert (cls_task / "out" / "adapterhub.json").is_file() and not (cls_task / ".out.partial").exists()


@pytest.mark.parametrize("where, needle", [
    ("isfile/sub", "--output 'isfile/sub' cannot be written: 'isfile' is a file, not a folder"),
    ("locked/new/out", "--output 'locked/new/out' cannot be written: folder 'locked' is not writable by this user"),
])
def test_an_output_under_a_file_or_an_unwritable_folder(capsys, cls_task, monkeypatch, where, needle):
    """Checked before the backbone loads: one line, exit 2, no folders made on the way."""
    from adapterhub_lite.training.recipes import train as train_mod

    (cls_task / "isfile").write_text("a file\n")
    (cls_task / "locked").mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.path.basename(p) == "locked" else real_access(p, mode, **kw))
    monkeypatch.setattr(train_mod, "load_backbone", lambda *a, **k: pytest.fail("the backbone loaded before the output was checked"))
    refused(capsys, cls_task, ["train", "toy.yaml", "--output", where, "--no-progress"], needle)


def test_an_existing_output_names_the_flag_and_the_python_argument(tmp_path):
    """The refusal reaches CLI and Python callers alike: it names --overwrite and train()'s overwrite=True."""
    from adapterhub_lite.core.errors import OutputExistsError
    from adapterhub_lite.training.output import prepare_output

    (tmp_path / "out").mkdir()
    with pytest.raises(OutputExistsError, match=r"--overwrite to replace it \(train\(\): overwrite=True\)"):
        prepare_output(tmp_path / "out", overwrite=False, resume=False)
