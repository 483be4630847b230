"""The CLI audit's leftovers: each user mistake is one `error:` line naming the problem, the value and the fix, exit 2,
nothing written."""

import json
import sys

import pytest
import yaml

from adapterhub_lite.cli import main
from adapterhub_lite.core.errors import AdapterHubError

from .test_bad_inputs import refused


@pytest.fixture
def registry(tmp_path, adapters, capsys, monkeypatch):
    """A local registry holding cls_a at 1.0.0 and 1.0.1 (the test runs in tmp_path: a pull --to that is not refused
    writes there, not into the repository)."""
    monkeypatch.chdir(tmp_path)
    reg = tmp_path / "reg"
    for _ in range(2):
        assert main(["publish", str(adapters["cls_a"]), "--registry", str(reg)]) == 0
    capsys.readouterr()
    return reg


@pytest.mark.parametrize("argv", [["list"], ["info", "cls_a"], ["verify"], ["reindex"], ["pull", "cls_a", "--to", "x"],
                                  ["publish", "ADAPTER"], ["infer", "--input", "in.jsonl"], ["merge", "a", "b", "--weights", "1", "1", "--output", "m"]])
def test_a_registry_that_is_a_file(capsys, tmp_path, monkeypatch, adapters, argv):
    """Publish said "File exists (EEXIST) ...; free disk space", the readers that the registry does not exist."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("not a registry\n")
    (tmp_path / "in.jsonl").write_text('{"adapter": "base", "text": "hi"}\n')
    argv = [str(adapters["cls_a"]) if a == "ADAPTER" else a for a in argv]
    refused(capsys, tmp_path, [*argv, "--registry", "afile"], "--registry 'afile' is a file, not a folder; give a registry folder")


def test_pull_to_an_empty_destination(capsys, tmp_path, registry):
    """`--to ""` was read as the current folder: "destination '.' already exists"."""
    refused(capsys, tmp_path, ["pull", "cls_a", "--to", "", "--registry", str(registry)], "argument --to: '' is empty; give a folder path")


@pytest.mark.parametrize("argv, needle", [
    (["publish", "ADAPTER", "--registry", ""], "--registry is empty; give a registry folder"),  # it published into the current folder
    (["list", "--registry", ""], "--registry is empty"),  # it listed the current folder as an empty registry
    (["predict", "", "--text", "hi"], "argument adapter: '' is empty"),  # "'.' is not an adapter folder"
    (["train-multi", "a.yaml", "b.yaml", "--output", ""], "argument --output: '' is empty"),
    (["compose-fit", "a.yaml", "--from", "a", "b", "--output", ""], "argument --output: '' is empty"),
    (["merge", "a", "b", "--weights", "1", "1", "--output", ""], "argument --output: '' is empty"),
])
def test_an_empty_path_is_refused(capsys, tmp_path, monkeypatch, adapters, argv, needle):
    """An empty path reads as the current folder, which is never what was meant."""
    monkeypatch.chdir(tmp_path)
    refused(capsys, tmp_path, [str(adapters["cls_a"]) if a == "ADAPTER" else a for a in argv], needle)


def test_serve_ray_without_ray(capsys, tmp_path, monkeypatch):
    """Without Ray, `serve --ray` printed a bare line (no `error:`) and exited 1."""
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray → ImportError, as when it is not installed
    refused(capsys, tmp_path, ["serve", "--registry", str(tmp_path), "--ray"], "--ray needs Ray Serve, which is not installed: pip install")
    assert main(["serve", "--registry", str(tmp_path), "--ray"]) == 2


def test_predict_on_a_folder_that_does_not_exist(capsys, tmp_path):
    """It said "'nothere' is not an adapter folder: missing adapter_config.json, ..." (eval said it does not exist)."""
    refused(capsys, tmp_path, ["predict", str(tmp_path / "nothere"), "--text", "hi"],
            f"adapter folder {str(tmp_path / 'nothere')!r} does not exist")


@pytest.mark.parametrize("split", ["train", "dev"])
def test_an_empty_split_is_named_by_its_key_and_file(capsys, cls_task, split):
    """It said "split 'empty.jsonl' is empty; point the spec at a file with rows": which of train / dev was left to guess."""
    (cls_task / "empty.jsonl").write_text("\n")
    refused(capsys, cls_task, ["train", "toy.yaml", f"data.{split}=empty.jsonl", "--output", "out", "--no-progress"],
            f"data.{split} 'empty.jsonl' is empty (no rows); point data.{split} in the spec at a file with rows")


@pytest.mark.parametrize("labels, needle", [
    ("labels=['pos', 'neg']", "has label value(s) 'refund' not in labels (first at line 2); write a label word ('pos', 'neg') or its class index (0 to 1) "
                              "in column 'label', or add the value(s) to 'labels'"),
    ("labels={'pos': 'x', 'neg': 'z'}", "not in labels (first at line 2); write one of the keys of 'labels': 'pos', 'neg' in column 'label'"),
])
def test_a_label_not_in_labels_lists_what_can_be_written(capsys, cls_task, labels, needle):
    """It listed "valid: pos, neg, 0, 1": words and class indices in one list."""
    (cls_task / "refund.jsonl").write_text('{"text": "a", "label": "pos"}\n{"text": "b", "label": "refund"}\n')
    refused(capsys, cls_task, ["train", "toy.yaml", labels, "data.train=refund.jsonl", "--output", "out", "--no-progress"], needle)


@pytest.mark.parametrize("argv", [["info", "cls_a@"], ["pull", "cls_a@", "--to", "x"]])
def test_an_empty_version_after_at_is_refused(capsys, tmp_path, registry, argv):
    """`info cls_a@` showed the latest version, as if the version had not been left out."""
    refused(capsys, tmp_path, [*argv, "--registry", str(registry)],
            "'cls_a@' names an empty version after '@'; give cls_a@MAJOR.MINOR.PATCH, cls_a@latest, or 'cls_a' alone")


def test_publishing_a_version_again_names_it_and_the_way_on(capsys, tmp_path, adapters, registry):
    """It said "version 1.0.1 is already published ...": not which adapter, nor that publish has no --overwrite."""
    refused(capsys, tmp_path, ["publish", str(adapters["cls_a"]), "--version", "1.0.1", "--registry", str(registry)],
            "cls_a@1.0.1 is already published and versions are immutable (publish has no --overwrite); publish this folder as a "
            "new version: --version auto (gives 1.0.2) or another --version MAJOR.MINOR.PATCH")


@pytest.mark.parametrize("ref, needle", [
    ("cls_a@9.9.9", "name 'cls_a@9.9.9': no version '9.9.9' of 'cls_a' in reg (versions: 1.0.0, 1.0.1); name a published version"),
    ("nosuch@1.0.0", "name 'nosuch@1.0.0': no adapter 'nosuch' in registry reg"),
    ("cls_a@", ": 'cls_a@' names an empty version after '@'; give cls_a@MAJOR.MINOR.PATCH"),
])
def test_infer_naming_a_version_it_does_not_hold(capsys, tmp_path, monkeypatch, registry, ref, needle):
    """It loaded the backbone, then said "unknown adapter 'cls_a@9.9.9'; known: cls_a, ...": no versions."""
    from adapterhub_lite.serving import router

    monkeypatch.setattr(router, "load_backbone", lambda *a, **k: pytest.fail("the backbone loaded before the requests were checked"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.jsonl").write_text(f'{{"adapter": "cls_a", "text": "a"}}\n{{"adapter": "{ref}", "text": "b"}}\n')
    refused(capsys, tmp_path, ["infer", "--input", str(tmp_path / "in.jsonl"), "--registry", "reg"], f"on line(s) [2]{'' if needle[0] == ':' else ' '}{needle}")


def test_infer_and_router_run_serve_a_pinned_version_as_serve_does(capsys, tmp_path, registry):
    """`serve` answers model "cls_a@1.0.0" with that version; infer refused it ("infer serves the latest version") and
    Router.run said "unknown adapter" — one engine, three answers. Now each registers the pinned version on first use."""
    from adapterhub_lite.serving.router import Router

    (tmp_path / "in.jsonl").write_text('{"adapter": "cls_a@1.0.0", "text": "a"}\n{"adapter": "cls_a", "text": "a"}\n')
    assert main(["infer", "--input", str(tmp_path / "in.jsonl"), "--registry", str(registry), "--output", str(tmp_path / "out.jsonl"),
                 "--no-progress"]) == 0
    pinned, latest = map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())
    assert (pinned["adapter"], latest["adapter"]) == ("cls_a@1.0.0", "cls_a") and pinned["prediction"] == latest["prediction"]
    router = Router.from_registry(str(registry))
    try:
        assert router.run([{"adapter": "cls_a@1.0.0", "text": "a"}])[0]["adapter"] == "cls_a@1.0.0"
        assert str(router.folders["cls_a@1.0.0"]) == str(router.registry.location("cls_a", "1.0.0"))
        with pytest.raises(AdapterHubError, match=r"no version '9.9.9' of 'cls_a' in .* \(versions: 1.0.0, 1.0.1\)"):
            router.run([{"adapter": "cls_a@9.9.9", "text": "a"}])
    finally:
        router.close()


@pytest.mark.parametrize("dies_at, said", [
    (2, "interrupted; the checkpoint at step 2 is kept in .out.partial/checkpoint: run the same command with --resume to continue "
        "from it, or with --overwrite to start over"),
    (1, "interrupted before the first checkpoint of 'out' (there is none to --resume from); run the same command again to start over"),
])
def test_ctrl_c_during_train_says_how_to_go_on(capsys, cls_task, monkeypatch, dies_at, said):
    """Ctrl-C printed "interrupted" alone: not that the run can be continued with --resume."""
    from adapterhub_lite.training.recipes import train as train_mod

    real_save, saves = train_mod.Checkpoint.save, []

    def save(self, payload):
        saves.append(payload["state"]["step"])
        if len(saves) == dies_at:
            raise KeyboardInterrupt  # Ctrl-C while the run writes its next checkpoint
        real_save(self, payload)

    monkeypatch.setattr(train_mod.Checkpoint, "save", save)
    argv = ["train", "toy.yaml", "train.max_steps=4", "train.checkpoint_every=2", "--output", "out", "--no-progress"]
    assert main(argv) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == said
    if dies_at == 2:  # the advice works
        monkeypatch.setattr(train_mod.Checkpoint, "save", real_save)
        assert main([*argv, "--resume"]) == 0 and (cls_task / "out" / "adapterhub.json").is_file()


@pytest.mark.parametrize("command", ["train-multi", "compose-fit"])
def test_a_second_run_into_the_same_output_is_refused(capsys, cls_task, monkeypatch, adapters, command):
    """train had the output lock; train-multi and compose-fit did not: two runs into one --output both ran."""
    from filelock import FileLock

    from adapterhub_lite.training.recipes import compose, joint

    for module in (compose, joint):
        monkeypatch.setattr(module, "load_backbone", lambda *a, **k: pytest.fail("the backbone loaded while another run held the output"))
    other = yaml.safe_load((cls_task / "toy.yaml").read_text())
    (cls_task / "other.yaml").write_text(yaml.safe_dump({**other, "name": "other"}))
    argv = {"train-multi": ["train-multi", "toy.yaml", "other.yaml", "--output", "out", "--no-progress"],
            "compose-fit": ["compose-fit", "toy.yaml", "--from", str(adapters["cls_a"]), str(adapters["cls_b"]), "--output", "out"]}[command]
    with FileLock(str(cls_task / ".out.lock")):  # another run holds it
        refused(capsys, cls_task, argv, "output 'out' is being written by another run right now")


@pytest.fixture
def launcher_store(monkeypatch, tmp_path):
    """The store torchrun's agent runs, here in this process; this process plays rank 1 of 2 (in tmp_path)."""
    monkeypatch.chdir(tmp_path)
    import socket
    from datetime import timedelta

    from torch.distributed import TCPStore

    from adapterhub_lite.cli import ranks

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=5), wait_for_workers=False)
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "1", "WORLD_SIZE": "2",
                       "TORCHELASTIC_RUN_ID": "t", "TORCHELASTIC_RESTART_COUNT": "0"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(ranks, "WAIT_S", 0.5)
    return store


@pytest.mark.parametrize("rank0_said, quiet", [("same", True), ("other", False), (None, False)])
def test_a_rank_above_0_is_quiet_only_for_what_rank_0_refused(capsys, tmp_path, launcher_store, rank0_said, quiet):
    """Under torchrun every process printed the same refusal; now rank 0 alone does — but a process whose refusal is
    not rank 0's (another one, or rank 0 refused nothing) still prints its own."""
    argv = ["pull", "cls_a@", "--to", "x", "--registry", str(tmp_path)]
    if rank0_said == "same":
        launcher_store.set("adapterhub_lite/refused/t/0", "'cls_a@' names an empty version after '@'; give cls_a@MAJOR.MINOR.PATCH, "
                                                         "cls_a@latest, or 'cls_a' alone for its latest version")
    elif rank0_said == "other":
        launcher_store.set("adapterhub_lite/refused/t/0", "something else")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (err == "") if quiet else (err.startswith("error: 'cls_a@' names an empty version") and err.count("\n") == 1), err


def test_rank_0_prints_and_leaves_its_refusal_for_the_others(capsys, tmp_path, launcher_store, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    assert main(["pull", "cls_a@", "--to", "x", "--registry", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: 'cls_a@' names an empty version")
    assert launcher_store.get("adapterhub_lite/refused/t/0").decode().startswith("'cls_a@' names an empty version")


@pytest.mark.multiprocess
def test_under_torchrun_a_bad_input_is_one_line(cls_task):
    """Both processes refuse train.max_steps=0; the refusal is printed once (the launcher's own failure summary stays)."""
    from .test_distributed import run

    done = run(["train", "toy.yaml", "train.max_steps=0", "--output", "out", "--no-progress"], 2, cls_task, timeout=120)
    assert done.returncode != 0
    said = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert said == ["error: invalid task spec toy.yaml: train.max_steps must be ≥ 1, got 0"], done.stderr[-3000:]


def test_infer_reads_name_at_latest_as_the_server_does(capsys, tmp_path, registry):
    """name@latest is name (as serve reads it; it was "unknown adapter"); the answer names the adapter that answered, as for
    'auto'. An empty version is refused with its line."""
    (tmp_path / "in.jsonl").write_text('{"adapter": "cls_a@latest", "text": "pos 1"}\n')
    assert main(["infer", "--input", str(tmp_path / "in.jsonl"), "--registry", str(registry), "--no-progress"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["adapter"] == "cls_a" and answer["text"] == "pos 1" and answer["prediction"] in ("pos", "neg"), answer
    (tmp_path / "in.jsonl").write_text('{"adapter": "cls_a@", "text": "pos 1"}\n')
    refused(capsys, tmp_path, ["infer", "--input", str(tmp_path / "in.jsonl"), "--registry", str(registry)],
            "in.jsonl: request(s) on line(s) [1]: 'cls_a@' names an empty version after '@'")


@pytest.mark.parametrize("command", ["train", "train-multi"])
def test_overwrite_discards_an_interrupted_checkpoint(capsys, cls_task, monkeypatch, command):
    """--overwrite starts over: an interrupted run's checkpoint goes before training starts, so a run stopped before its
    own first checkpoint leaves nothing for a later --resume to continue (the run --overwrite was to discard).
    train-multi left the old checkpoint in place (train discarded it)."""
    from adapterhub_lite.training.recipes import joint, train

    specs = ["toy.yaml"]
    if command == "train-multi":
        other = yaml.safe_load((cls_task / "toy.yaml").read_text())
        (cls_task / "other.yaml").write_text(yaml.safe_dump({**other, "name": "other"}))
        specs.append("other.yaml")
    old = cls_task / ".out.partial" / "checkpoint"
    old.mkdir(parents=True)
    (old / "state.pt").write_bytes(b"an interrupted run's")

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C before the first checkpoint

    monkeypatch.setattr(joint if command == "train-multi" else train, "fit", stopped)
    assert main([command, *specs, "--output", "out", "--overwrite", "--no-progress"]) == 130
    assert not old.exists()
    assert "interrupted before the first checkpoint of 'out'" in capsys.readouterr().err
