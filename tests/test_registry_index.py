"""The registry's index is never re-created over a populated registry: a lost, linked or damaged index.json is
refused by every command (one line, nothing written or deleted), and `reindex` rebuilds it from the checked folders."""

import json
import os

import pytest

from adapterhub_lite.artifacts.registry import LocalRegistry, RegistryError
from adapterhub_lite.cli import main


@pytest.fixture
def reg(adapters, tmp_path):
    """cls_a@1.0.0 and cls_b@1.0.0."""
    r = LocalRegistry(tmp_path / "reg")
    for folder in adapters.values():
        r.publish(folder, "1.0.0")
    return tmp_path / "reg"


def snapshot(root) -> dict:
    """Every file under the registry (the lock aside) with its bytes, and every link with its target."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.name == ".lock":
            continue
        rel = str(p.relative_to(root))
        out[rel] = ("link", os.readlink(p)) if p.is_symlink() else p.read_bytes() if p.is_file() else "dir"
    return out


LOSSES = {
    "deleted": lambda index, tmp: index.unlink(),
    "a link to the null device": lambda index, tmp: (index.unlink(), index.symlink_to("/dev/null")),
    "a link to a folder": lambda index, tmp: (index.unlink(), index.symlink_to(tmp)),
    "a dangling link": lambda index, tmp: (index.unlink(), index.symlink_to(tmp / "gone.json")),
    "a folder": lambda index, tmp: (index.unlink(), index.mkdir()),
}


@pytest.mark.parametrize("loss", list(LOSSES))
def test_a_lost_index_is_refused_by_every_command_and_nothing_is_deleted(reg, adapters, tmp_path, capsys, loss):
    LOSSES[loss](reg / "index.json", tmp_path)
    before = snapshot(reg)
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"adapter": "cls_a", "text": "pos 1"}\n')
    for argv in (["list"], ["verify"], ["info", "cls_a"], ["pull", "cls_a", "--to", str(tmp_path / "pulled")],
                 ["publish", str(adapters["cls_b"]), "--name", "cls_a"], ["publish", str(adapters["cls_b"]), "--name", "new"],
                 ["infer", "--input", str(requests)], ["serve", "--port", "0"]):
        assert main([*argv, "--registry", str(reg)]) == 2, (loss, argv)
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "reindex" in err, (argv, err)
    assert snapshot(reg) == before  # the publish that picked 1.0.0 used to delete cls_a@1.0.0 and write an index of one
    assert not (tmp_path / "pulled").exists()


def test_reindex_rebuilds_the_index_from_the_checked_folders(reg, adapters, tmp_path, capsys):
    original = json.loads((reg / "index.json").read_text())
    (reg / "index.json").write_text('{"format": "adapterhub_lite.registry/1", "adapters": {"cls_a": ')  # damaged
    assert main(["reindex", "--registry", str(reg)]) == 0
    assert json.loads(capsys.readouterr().out) == {"registry": str(reg), "rebuilt": ["cls_a@1.0.0", "cls_b@1.0.0"]}
    rebuilt = json.loads((reg / "index.json").read_text())
    for name in ("cls_a", "cls_b"):  # the same records as the publishes wrote (the time aside)
        want, got = original["adapters"][name]["1.0.0"], rebuilt["adapters"][name]["1.0.0"]
        assert {k: v for k, v in got.items() if k != "created"} == {k: v for k, v in want.items() if k != "created"}
    assert [p.name for p in reg.glob("index.json.damaged-*")]  # the damaged one is kept beside
    assert main(["verify", "--registry", str(reg)]) == 0
    capsys.readouterr()
    assert main(["reindex", "--registry", str(reg)]) == 2  # a readable index is not rebuilt
    assert "is readable" in capsys.readouterr().err


def test_reindex_refuses_a_folder_that_would_not_publish_and_writes_nothing(reg, capsys):
    (reg / "index.json").unlink()
    (reg / "cls_b" / "1.0.0" / "adapter_model.bin").write_bytes(b"pickle")
    before = snapshot(reg)
    assert main(["reindex", "--registry", str(reg)]) == 2
    err = capsys.readouterr().err
    assert "cls_b@1.0.0" in err and "pickle" in err and "\n" not in err.strip()
    assert snapshot(reg) == before and not (reg / "index.json").exists()


def test_an_empty_registry_folder_still_takes_its_first_publish(adapters, tmp_path):
    (tmp_path / "fresh").mkdir()
    assert LocalRegistry(tmp_path / "fresh").publish(adapters["cls_a"])[:2] == ("cls_a", "1.0.0")


@pytest.mark.parametrize("damage", ["deeply nested", "a 5,000-digit number", "an entry with an empty base"])
def test_hostile_indexes_are_one_line(reg, capsys, damage):
    index = reg / "index.json"
    text = index.read_text()
    index.write_text({"deeply nested": "[" * 100_000 + "]" * 100_000, "a 5,000-digit number": text.replace('"size": ', '"size": ' + "9" * 5000, 1),
                      "an entry with an empty base": json.dumps({**json.loads(text), "adapters": {"cls_a": {"1.0.0": {
                          **json.loads(text)["adapters"]["cls_a"]["1.0.0"], "base": {}}}}})}[damage])
    for argv in (["list"], ["verify"], ["info", "cls_a"]):
        assert main([*argv, "--registry", str(reg)]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err


def test_a_hub_registry_without_its_index_but_with_version_folders_is_refused(monkeypatch):
    """The Hub's sibling of the lost index: the repository lists version folders, index.json is gone."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    from adapterhub_lite.artifacts.hub import HubRegistry

    class Api:
        def repo_info(self, repo):
            return type("Info", (), {"sha": "abc"})()

        def list_repo_files(self, repo, revision=None):
            return ["README.md", "cls_a/1.0.0/adapterhub.json", "cls_a/1.0.0/adapter_model.safetensors"]

    def missing(*args, **kwargs):
        raise EntryNotFoundError("index.json")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", missing)
    reg = HubRegistry("org/adapters")
    reg.api = Api()
    with pytest.raises(RegistryError, match=r"holds version folders \(cls_a@1.0.0\) but no index.json"):
        reg.index()


def test_versions_order_by_number_not_by_text():
    """1.10.0 is after 1.9.0 wherever versions are ordered: `latest`, the next `auto` version, listings."""
    from adapterhub_lite.artifacts.index import next_version, version_key

    shuffled = ["1.10.0", "10.0.0", "1.0.9", "2.0.0", "1.9.0", "1.0.10"]
    assert sorted(shuffled, key=version_key) == ["1.0.9", "1.0.10", "1.9.0", "1.10.0", "2.0.0", "10.0.0"]
    assert next_version(dict.fromkeys(["1.9.0", "1.10.0"]), "auto") == "1.10.1"
    assert next_version(dict.fromkeys(["1.0.9", "1.0.10"]), "auto") == "1.0.11"
    assert next_version(dict.fromkeys(["9.0.0", "10.0.0"]), "auto") == "10.0.1"


def test_the_entry_of_a_config_that_leaves_r_to_peft_has_peft_s_rank(adapters, tmp_path, capsys):
    """adapter_config.json without "r" is LoraConfig's default r=8 to peft (PeftModel.from_pretrained loads it so); the
    index entry said rank null and `list` showed '-'."""
    import shutil

    folder = tmp_path / "bare"
    shutil.copytree(adapters["cls_a"], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config.pop("r") == 8  # the package's default rank, peft's too: the factors fit the config without it
    (folder / "adapter_config.json").write_text(json.dumps(config))
    r = LocalRegistry(tmp_path / "reg")
    r.publish(folder, "1.0.0", name="bare")
    assert r.index()["adapters"]["bare"]["1.0.0"]["rank"] == 8
    assert main(["verify", "--registry", str(tmp_path / "reg")]) == 0  # the entry agrees with the files it is derived from
    capsys.readouterr()
    assert main(["list", "--registry", str(tmp_path / "reg"), "--json"]) == 0
    assert [row["rank"] for row in json.loads(capsys.readouterr().out)] == [8]
