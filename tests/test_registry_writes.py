"""Registry writers and readers under races and leftovers: a Hub version downloaded at the commit its index was read
at, stale temp folders of killed writers (pull, merge, interference, export), version folders the index does not list,
and registry paths that name something else (an adapter folder)."""

import shutil
from pathlib import Path

import pytest

from adapterhub_lite.artifacts.registry import LocalRegistry

from .conftest import train_tiny


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
