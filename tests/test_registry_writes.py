"""Registry writers and readers under races and leftovers: a Hub version downloaded at the commit its index was read
at, stale temp folders of killed writers (pull, merge, interference, export), version folders the index does not list,
and registry paths that name something else (an adapter folder)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import adapterhub_lite.artifacts.files as files
from adapterhub_lite.artifacts.registry import LocalRegistry, RegistryError

from .conftest import train_tiny
from .test_registry import kill_at_stall


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("adapter"))


def _hub_at_commits(monkeypatch, contents: dict, head: str, cache: Path) -> list:
    """huggingface_hub offline over `contents` ({commit: a local registry as the repository held it then}, None: the
    branch head's files); repo_info says the head is `head`. Returns the revisions the downloads asked for."""
    import fnmatch

    import huggingface_hub

    asked = []

    def snapshot_download(repo, revision=None, allow_patterns=(), local_dir=None, **kwargs):
        asked.append(revision)
        content = contents[revision]
        for p in sorted(content.rglob("*")):
            rel = p.relative_to(content).as_posix()
            if p.is_file() and not rel.startswith(".") and any(fnmatch.fnmatch(rel, pat) for pat in allow_patterns):
                (Path(local_dir) / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, Path(local_dir) / rel)
        return str(local_dir)

    class Api:
        def repo_info(self, repo):
            return type("Info", (), {"sha": head})()

    monkeypatch.setenv("ADAPTERHUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name, revision=None, **kw: str(contents[revision] / name))
    return asked


def test_a_hub_version_is_downloaded_at_the_commit_its_index_was_read_at(adapter, tmp_path, monkeypatch):
    """The index was read at the head's commit, the version's files downloaded from the branch as it stood at the
    download: a commit landing in between (here: toy@1.0.0's card rewritten, as a version deleted and re-published
    would be) served its bytes, refused as an integrity failure of a version the user's index never saw change."""
    from adapterhub_lite.artifacts.hub import HubRegistry

    read_at, moved = tmp_path / "c1", tmp_path / "main"
    LocalRegistry(read_at).publish(adapter, "1.0.0")
    shutil.copytree(read_at, moved)
    (moved / "toy" / "1.0.0" / "README.md").write_text("rewritten after the index was read\n")
    asked = _hub_at_commits(monkeypatch, {"c1": read_at, None: moved}, "c1", tmp_path / "cache")
    reg = HubRegistry("org/adapters")
    folder = reg.path("toy@1.0.0")
    assert (folder / "README.md").read_bytes() == (read_at / "toy" / "1.0.0" / "README.md").read_bytes() and set(asked) == {"c1"}
    assert reg.verify() == [] and set(asked) == {"c1"}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


STALLED_PULL = """
import sys, time, pathlib
import adapterhub_lite.artifacts.registry as r
root, to, marker = sys.argv[1:]
copy = r.copy_hashing
def slow(src, dst):  # stalls after the first file is copied, to be SIGKILLed there
    out = copy(src, dst)
    pathlib.Path(marker).touch()
    time.sleep(600)
    return out
r.copy_hashing = slow
r.LocalRegistry(root).pull("toy", to)
"""


def test_a_pull_killed_mid_copy_leaves_a_temp_the_next_pull_to_that_folder_clears(adapter, tmp_path):
    """A pull SIGKILLed mid-copy cannot remove its hidden `.<to>.pull-…` folder, and its random name told no later
    pull whether its writer was alive: it stayed beside the output for good. A live pull's temp is left alone."""
    reg, to, marker = tmp_path / "reg", tmp_path / "out" / "toy", tmp_path / "stalled"
    LocalRegistry(reg).publish(adapter, "1.0.0")
    kill_at_stall([STALLED_PULL, str(reg), str(to), str(marker)], marker)
    killed = list(to.parent.glob(".toy.pull-*"))
    assert len(killed) == 1 and not to.exists()
    live = to.parent / f".toy.pull-aaaa0002-{os.getpid()}-{files.host()}"  # another pull, still copying
    live.mkdir()
    assert LocalRegistry(reg).pull("toy", to) == to and LocalRegistry(reg).verify() == []
    assert sorted(p.name for p in to.parent.iterdir()) == sorted(["toy", live.name])


@pytest.mark.parametrize("kind", ["merge", "report", "write"])
def test_a_killed_merge_interference_or_export_leaves_a_temp_the_next_write_of_that_output_clears(adapter, tmp_path, kind):
    """merge (the adapter folder), interference (report.json + heatmap.png) and export --output (the script,
    atomic_write) build their output in a hidden temp beside it; one killed before its rename stayed there for good
    (a random name, nobody to clear it). The next write of that output clears those of dead processes, never a live
    writer's."""
    out = tmp_path / "out" / ("serve.sh" if kind == "write" else "result")
    out.parent.mkdir()
    dead = out.parent / f".{out.name}.{kind}-aaaa0001-{_dead_pid()}-{files.host()}"
    live = out.parent / f".{out.name}.{kind}-aaaa0002-{os.getpid()}-{files.host()}"
    for tmp in (dead, live):
        tmp.mkdir()
        (tmp / "partial").write_text("half")
    if kind == "merge":
        from adapterhub_lite.ops.merge import merge_adapters

        merge_adapters({"toy": adapter}, {"toy": 1.0}, "linear", output=out, name="mix", report_rows=0, dtype="fp32")
    elif kind == "report":
        from adapterhub_lite.ops.interference import _save

        _save({"tasks": ["toy"], "columns": ["base"], "metric": {"toy": "accuracy"}, "scores": {"toy": {"base": 0.5}}, "flags": []}, out)
    else:
        from adapterhub_lite.cli.export import write_script

        write_script(out, "#!/bin/sh\n")
    assert out.exists() and sorted(p.name for p in out.parent.iterdir()) == sorted([out.name, live.name])


@pytest.mark.parametrize("how", ["auto", "1.0.1"])
def test_a_version_folder_the_index_does_not_list_is_refused_not_replaced(adapter, tmp_path, capsys, how):
    """A folder <name>/<version>/ that the index does not list, copied in by hand (or left by a publish killed before
    this was kept track of), was deleted by the next publish of that version, without a word: its files may be a
    user's only copy. A publish killed after its rename (.placing.json names its folder) is still cleared."""
    from adapterhub_lite.cli import main

    reg = tmp_path / "reg"
    LocalRegistry(reg).publish(adapter, "1.0.0")
    index = (reg / "index.json").read_text()
    hand = reg / "toy" / "1.0.1"
    shutil.copytree(adapter, hand)
    (hand / "notes.txt").write_text("mine")
    assert main(["publish", str(adapter), "--registry", str(reg), "--version", how]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: registry {reg} already holds a folder toy/1.0.1/ that its index does not list") and "\n" not in err
    assert err.endswith("move it out of the registry, then publish again, or give another --version (auto chooses this one again: it "
                        "follows the listed versions)")
    assert (hand / "notes.txt").read_text() == "mine" and (reg / "index.json").read_text() == index
    assert not list(reg.glob(".publish-*"))
    shutil.rmtree(hand)
    shutil.copytree(adapter, hand)  # as a publisher killed between its rename and the index write leaves it
    (reg / ".placing.json").write_text(json.dumps({"name": "toy", "version": "1.0.1"}))
    assert LocalRegistry(reg).publish(adapter, how)[1] == "1.0.1" and LocalRegistry(reg).verify() == []
    assert not (reg / ".placing.json").exists()


def test_a_hub_publish_over_files_the_index_does_not_list_is_refused(adapter, monkeypatch):
    """The Hub's sibling: files uploaded by hand under toy/1.0.0/ without an index entry were overwritten by the
    publish's commit (those of the same name) or kept beside its files (the others: an 'unexpected file' for ever)."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    from adapterhub_lite.artifacts.hub import HubRegistry

    commits = []

    class Api:
        def repo_info(self, repo):
            return type("Info", (), {"sha": "abc"})()

        def list_repo_files(self, repo, revision=None):
            return ["README.md", "toy/1.0.0/adapter_model.safetensors", "toy/1.0.0/mine.txt"]

        def create_commit(self, repo, ops, **kwargs):
            commits.append(ops)

    def no_index(*args, **kwargs):
        raise EntryNotFoundError("index.json")
    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_index)
    with pytest.raises(RegistryError, match=r"registry hf://org/adapters already holds a folder toy/1.0.0/ that its index does not list"):
        HubRegistry("org/adapters").publish(adapter)
    assert commits == []


@pytest.mark.parametrize("argv", [["export", "vllm"], ["list"], ["verify"], ["info", "toy"], ["publish", "ADAPTER"]])
def test_an_adapter_folder_given_as_the_registry_is_named_as_one(adapter, tmp_path, capsys, argv):
    """`export --registry runs/sst2` said the folder "holds no adapters" (it holds one), `list` printed an empty table
    with exit 0, and publish wrote a registry into the adapter's folder. A version folder of a registry names its
    registry."""
    from adapterhub_lite.cli import main

    folder = tmp_path / "toy"
    shutil.copytree(adapter, folder)
    before = sorted(p.name for p in folder.iterdir())
    argv = [str(adapter) if a == "ADAPTER" else a for a in argv]
    assert main([*argv, "--registry", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: registry {str(folder)!r} is an adapter folder (it holds adapter_config.json), not a registry; pass the registry "
                   f"folder that holds the adapter (default: adapters), or publish it into one first: "
                   f"`adapterhub-lite publish {folder} --registry adapters`")
    assert sorted(p.name for p in folder.iterdir()) == before
    LocalRegistry(tmp_path / "reg").publish(adapter, "1.0.0")
    version = tmp_path / "reg" / "toy" / "1.0.0"
    assert main([*argv, "--registry", str(version)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: registry {str(version)!r} is the version folder of toy@1.0.0 in registry "
                                               f"{str(tmp_path / 'reg')!r}, not a registry; pass --registry {tmp_path / 'reg'}")


@pytest.mark.parametrize("to, needle", [
    ("afile/sub", "--to '{t}/afile/sub': '{t}/afile' is a file, not a folder; choose a --to under a folder"),
    ("reg/toy/1.0.1", "--to '{t}/reg/toy/1.0.1' is inside registry '{t}/reg'; pull copies a version out: choose a --to outside it"),
    ("dangling", "destination '{t}/dangling' already exists; choose a new --to folder"),
    ("raced", "destination '{t}/raced' was created while toy was copied (another pull to it?); it is left as it is and nothing was pulled"),
])
def test_a_pull_to_where_it_cannot_go_is_one_line_naming_why(adapter, tmp_path, capsys, monkeypatch, to, needle):
    """pull --to under a file said "File exists (EEXIST) …; free disk space", a --to inside the registry made an unlisted
    version folder there (a later publish of that version is refused for it), and a --to another pull created while
    this one copied said "Directory not empty …; free disk space"."""
    import adapterhub_lite.artifacts.registry as registry
    from adapterhub_lite.cli import main

    LocalRegistry(tmp_path / "reg").publish(adapter, "1.0.0")
    (tmp_path / "afile").write_text("a file")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")  # a rename over it would replace the link
    if to == "raced":
        copy = registry.copy_hashing

        def racing(src, dst):  # another pull renames its copy into place meanwhile
            (tmp_path / "raced").mkdir(exist_ok=True)
            (tmp_path / "raced" / "theirs.txt").write_text("theirs")
            return copy(src, dst)
        monkeypatch.setattr(registry, "copy_hashing", racing)
    before = sorted(str(p) for p in tmp_path.rglob("*") if "raced" not in p.parts)
    assert main(["pull", "toy", "--registry", str(tmp_path / "reg"), "--to", str(tmp_path / to)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: " + needle.format(t=tmp_path)) and "\n" not in err, err
    assert sorted(str(p) for p in tmp_path.rglob("*") if "raced" not in p.parts) == before
    assert to != "raced" or [p.name for p in (tmp_path / "raced").iterdir()] == ["theirs.txt"]


@pytest.mark.parametrize("flag, value, needle", [
    ("--name", "a" * 101, "invalid adapter name '" + "a" * 40 + "…' (101 characters): names are at most 100 characters"),
    ("--version", "1.0." + "9" * 300, "invalid version '1.0." + "9" * 36 + "…' (304 characters): at most 100; use smaller numbers"),
])
def test_a_name_or_version_past_its_length_says_so(adapter, tmp_path, capsys, flag, value, needle):
    """A 101-letter name was told to 'use letters, digits, …' (it did), and a version of 300 digits failed at mkdir as
    'File name too long (ENAMETOOLONG) …; free disk space or make the registry writable'."""
    from adapterhub_lite.cli import main

    LocalRegistry(tmp_path / "reg").publish(adapter, "1.0.0")
    index = (tmp_path / "reg" / "index.json").read_text()
    assert main(["publish", str(adapter), "--registry", str(tmp_path / "reg"), flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: " + needle) and "\n" not in err, err
    assert (tmp_path / "reg" / "index.json").read_text() == index and sorted(p.name for p in (tmp_path / "reg" / "toy").iterdir()) == ["1.0.0"]


def test_a_full_disk_while_the_interference_report_is_written_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    """Every cell scored, then the disk is full: a dozen-line OSError traceback (exit 1); the temp was cleared already."""
    import errno

    import adapterhub_lite.ops.interference as interference
    from adapterhub_lite.core.errors import AdapterHubError

    def full(path, obj):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    monkeypatch.setattr(interference, "write_json", full)
    out = tmp_path / "report"
    with pytest.raises(AdapterHubError, match=rf"^cannot write the report to --output '{out}': No space left on device \(ENOSPC\) at .*; "
                                              "free disk space or choose a writable --output, then run again \\(nothing was written\\)$"):
        interference._save({"tasks": [], "columns": [], "metric": {}, "scores": {}, "flags": []}, out)
    assert list(tmp_path.iterdir()) == []


def test_an_output_named_near_the_file_name_limit_is_still_written(tmp_path):
    """9fffd03 put the writer's pid and host into atomic_write's and temp_beside's temp names: a file named 236 bytes,
    written before, then failed with 'File name too long' (its temp name ran past 255 bytes)."""
    out = tmp_path / ("a" * 230 + ".jsonl")
    files.atomic_write(out, "x\n")
    assert out.read_text() == "x\n" and [p.name for p in tmp_path.iterdir()] == [out.name]
    assert len(files.temp_beside(tmp_path / ("b" * 236), "merge").name.encode()) <= 255


@pytest.mark.parametrize("left", [{"name": "toy", "version": "1.0.0"}, {"name": "..", "version": "1.0.0"}, {"name": "toy"}, "not json"])
def test_a_placing_record_never_clears_a_listed_version_or_a_path_outside_the_registry(adapter, tmp_path, left):
    """.placing.json of a publisher killed after writing its index (the version is listed), or one damaged or edited
    by hand, is dropped without removing anything."""
    reg = tmp_path / "reg"
    LocalRegistry(reg).publish(adapter, "1.0.0")
    (reg / ".placing.json").write_text(left if isinstance(left, str) else json.dumps(left))
    assert LocalRegistry(reg).publish(adapter)[1] == "1.0.1"
    assert LocalRegistry(reg).verify() == [] and not (reg / ".placing.json").exists() and (tmp_path / "reg").is_dir()


def test_a_publish_between_the_server_s_reads_of_latest_does_not_pair_one_version_s_folder_with_another_s_hashes(adapter, tmp_path):
    """inspect read the index twice, once for the folder of `latest` and once for its hashes: a publish landing between
    gave 1.0.0's folder with 1.0.1's hashes, and every later load of the adapter failed as an integrity error."""
    from adapterhub_lite.artifacts.folder import folder_hashes
    from adapterhub_lite.model.backbone import load_backbone
    from adapterhub_lite.serving.router import Router

    (tmp_path / "next").mkdir()
    other = train_tiny(tmp_path / "next", train={"seed": 7, "lr": 5e-2})
    reg = LocalRegistry(tmp_path / "reg")
    reg.publish(adapter, "1.0.0")
    read = reg.index
    published = []

    def index():
        out = read()
        if not published:  # the first read of the index, then another publisher lands
            published.append(reg.publish(other, "1.0.1"))
        return out
    reg.index = index
    got = Router(load_backbone("tiny-random-llama", "none", dtype="fp32"), reg).inspect("toy")
    assert published and got.folder.name == "1.0.0"
    assert got.hashes == folder_hashes(got.folder)
