"""The Hugging Face Hub as a registry (`hf://org/repo`), in the same layout as a local one.

A publish is one Hub commit holding the version's files and the updated index.json, made on top
of the commit the index was read from (`parent_commit`), so two publishers cannot overwrite each
other's index: the loser's commit is rejected and it retries on the new index.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import threading
from pathlib import Path

from adapterhub_lite.artifacts.folder import SIDECAR
from adapterhub_lite.artifacts.index import (
    RegistryError,
    check_case_clash,
    check_copy,
    check_same_base,
    make_entry,
    next_version,
    parse_index,
    publish_inputs,
    unlisted_folder,
)
from adapterhub_lite.artifacts.registry import Registry
from adapterhub_lite.core.names import cache_dir

_ATTEMPTS = 3


def hub_copies() -> Path:
    """Where Hub registries' versions are downloaded: hub/ in the package's cache folder (core.names.cache_dir)."""
    return cache_dir() / "hub"


def _hub_error(repo: str, exc: Exception) -> RegistryError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return RegistryError(f"cannot reach the Hugging Face Hub for hf://{repo} ({type(exc).__name__}: {first}); check the network and HF_TOKEN, or use a local --registry folder")


class HubRegistry(Registry):
    """A registry kept in a Hugging Face Hub model repository."""

    def __init__(self, repo: str):
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise RegistryError(f"hub registry 'hf://{repo}' must look like hf://org/repo")
        from huggingface_hub import HfApi

        self.repo, self.root, self.api = repo, f"hf://{repo}", HfApi()
        self._read_at = threading.local()  # .commit: the commit this thread last read the index at (a server reads on many)

    def _read_index(self) -> tuple[dict, str | None]:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

        try:
            head = self.api.repo_info(self.repo).sha
        except RepositoryNotFoundError:
            return parse_index(None, self.root), None
        except Exception as exc:
            raise _hub_error(self.repo, exc) from None
        try:
            path = hf_hub_download(self.repo, "index.json", revision=head)
        except EntryNotFoundError:
            found = sorted({"@".join(f.split("/")[:2]) for f in self._files(head) if f.count("/") == 2 and f.endswith("/" + SIDECAR)})
            if found:  # the index was deleted, not never written: an empty reading would forget every version
                raise RegistryError(f"registry {self.root} holds version folders ({', '.join(found[:3])}{' …' if len(found) > 3 else ''}) "
                                    "but no index.json: restore it from the repository's history (the Hub keeps every commit)") from None
            return parse_index(None, self.root), head
        except Exception as exc:
            raise _hub_error(self.repo, exc) from None
        return parse_index(Path(path).read_bytes(), f"{self.root}/index.json"), head

    def _files(self, head: str) -> list[str]:
        try:
            return self.api.list_repo_files(self.repo, revision=head)
        except Exception as exc:
            raise _hub_error(self.repo, exc) from None

    def index(self) -> dict:
        index, head = self._read_index()
        if head is None:  # publish creates the repository; reading one that does not exist is a mistake
            raise RegistryError(f"registry {self.root} does not exist (no such Hub repository); check --registry, or publish into it to create it")
        self._read_at.commit = head
        return index

    def _folder(self, name: str, version: str) -> Path:
        """The version's files, downloaded as regular files into this repository's own folder beside its index.json.

        Not the Hub cache's snapshot: its files are symlinks into the cache's blobs, which every way in refuses
        (folder.check_adapter_folder), so no Hub version could be served or loaded. With the index beside it, the
        copy is a local registry's version folder: loading it by its path re-hashes it (registry.check_if_registered).

        Downloaded at the commit the index was read at (index() runs first on this thread: resolve, verify), not at
        the branch head: a publish landing in between would otherwise serve that commit's bytes, refused as an
        integrity failure of a version nobody changed.
        """
        from huggingface_hub import snapshot_download

        commit = getattr(self._read_at, "commit", None) or self._read_index()[1]
        try:
            local = snapshot_download(self.repo, revision=commit, allow_patterns=[f"{name}/{version}/*", "index.json"],
                                      local_dir=hub_copies() / self.repo.replace("/", "--"))
        except Exception as exc:
            raise _hub_error(self.repo, exc) from None
        return Path(local) / name / version

    def publish(self, folder: str | Path, version: str = "auto", name: str | None = None, allow_base_change: bool = False) -> tuple[str, str, dict]:
        """Upload a version and the updated index in one commit; retry if the index moved. A version on another backbone
        than the name's latest is refused unless `allow_base_change` (index.check_same_base)."""
        from huggingface_hub import CommitOperationAdd

        folder, meta, name, peft_config = publish_inputs(folder, version, name)
        # each file read once: those bytes are checked (on a copy), hashed and uploaded, not the folder's files read
        # again at the upload, which a run still writing it could have changed meanwhile
        data = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}
        with tempfile.TemporaryDirectory() as tmp:
            for fname, content in data.items():
                (Path(tmp) / fname).write_bytes(content)
            meta, peft_config = check_copy(folder, Path(tmp))
        hashes = {fname: {"sha256": hashlib.sha256(content).hexdigest(), "size": len(content)} for fname, content in data.items()}
        attempt = 0
        while True:
            attempt += 1
            index, head = self._read_index()
            check_case_clash(index["adapters"], name)  # a pull of both onto a case-insensitive file system would mix them
            versions = index["adapters"].setdefault(name, {})
            chosen = next_version(versions, version, name)
            if head is not None and any(f.startswith(f"{name}/{chosen}/") for f in self._files(head)):  # uploaded by hand:
                raise unlisted_folder(self.root, name, chosen)  # the commit would overwrite its files, keep its others
            entry = make_entry(meta, peft_config, hashes)
            check_same_base(versions, entry, name, allow_base_change)
            versions[chosen] = entry
            ops = [CommitOperationAdd(f"{name}/{chosen}/{fname}", content) for fname, content in data.items()]
            ops.append(CommitOperationAdd("index.json", (json.dumps(index, indent=2) + "\n").encode()))
            try:
                if head is None:
                    self.api.create_repo(self.repo, exist_ok=True)
                self.api.create_commit(self.repo, ops, commit_message=f"publish {name}@{chosen}", parent_commit=head)
                return name, chosen, entry
            except Exception as exc:
                if "parent" not in str(exc).lower() or attempt == _ATTEMPTS:  # only a moved index is retried
                    raise _hub_error(self.repo, exc) from None

