"""Registry: publish, list, pull and verify versioned adapters, with integrity checks (load one with
loading.load_adapter(registry.path(ref))).

Layout (a local folder; `hf://org/repo` keeps the same layout on the Hugging Face Hub):

    <registry>/index.json                 {"format": …, "adapters": {name: {version: entry}}}
    <registry>/<name>/<version>/          the adapter folder: PEFT files, sidecar, model card …

The index is the truth: a version exists when, and only when, the index lists it (its format, names,
versions and entries: index.py). This module reads: resolve, list, verify, pull. Writing (publish and
reindex under the registry's file lock, and what a killed publisher leaves) is publishing.py's.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from adapterhub_lite.artifacts.files import os_problem, temp_beside
from adapterhub_lite.artifacts.folder import SIDECAR
from adapterhub_lite.artifacts.index import (
    RegistryError,
    check_name,
    entry_problems,
    hash_file,
    is_version_folder,
    parse_index,
    parse_ref,
    version_key,
)
from adapterhub_lite.artifacts.publishing import Publisher, copy_hashing


def _shown(items: list[str], most: int = 20, newest: bool = False) -> str:
    """At most `most` of a list (its first, or its last with `newest`) and the count: an error that named thousands of
    adapters or versions was one line no one could read."""
    if len(items) <= most:
        return ", ".join(items)
    return f"… {', '.join(items[-most:])} ({len(items)} in all)" if newest else f"{', '.join(items[:most])}, … ({len(items)} in all)"


class Registry:
    """What every registry kind shares: resolving references, listing, verifying, pulling.

    Subclasses provide `index()` (refusing a registry that does not exist), `publish()` and
    `_folder(name, version)` (a local folder holding that version's files).
    """

    root: object

    def index(self) -> dict:
        raise NotImplementedError

    def _folder(self, name: str, version: str) -> Path:
        raise NotImplementedError

    def resolve(self, ref: str) -> tuple[str, str, dict]:
        """Find (name, version, entry) for a reference such as sst2@latest."""
        name, version = parse_ref(ref)
        adapters = self.index()["adapters"]
        versions = adapters.get(name)
        if not versions:
            raise RegistryError(f"no adapter {name!r} in registry {self.root} (known: {_shown(sorted(adapters)) or 'none'})")
        if version == "latest":
            version = max(versions, key=version_key)
        if version not in versions:
            ordered = sorted(versions, key=version_key)  # with hundreds, the newest are shown: those are the ones meant
            raise RegistryError(f"no version {version!r} of {name!r} in {self.root} (versions: {_shown(ordered, newest=True)})")
        return name, version, versions[version]

    def rows(self) -> list[dict]:
        """One row per version, for `list`."""
        out = []
        for name, versions in sorted(self.index()["adapters"].items()):
            for version in sorted(versions, key=version_key):
                e = versions[version]
                out.append({"name": name, "version": version, "task": e["task"], "type": e["type"], "method": e["method"],
                            "rank": e.get("rank"), "base": e["base"].get("hub_id") or e["base"]["name"], "quantization": e["quantization"],
                            "metrics": e["metrics"]})
        return out

    def verify(self, name: str | None = None) -> list[str]:
        """Re-hash every file of every version (of one name); return the problems found."""
        if name is not None:
            check_name(name)
        adapters = self.index()["adapters"]
        problems = []
        for n, versions in sorted(adapters.items()):
            if name is None or n == name:
                for version, entry in sorted(versions.items(), key=lambda kv: version_key(kv[0])):
                    problems += self._check_files(n, version, entry)
        if name is not None and name not in adapters:
            problems.append(f"no adapter {name!r} in registry {self.root}")
        return problems

    def _check_files(self, name: str, version: str, entry: dict) -> list[str]:
        folder = self._folder(name, version)
        problems = []
        for fname, want in sorted(entry["files"].items()):
            path = folder / fname
            try:
                if not path.is_file():
                    problems.append(f"{name}@{version}: {fname} is missing")
                elif path.stat().st_size != want["size"] or hash_file(path) != want["sha256"]:
                    problems.append(f"{name}@{version}: {fname} does not match its recorded sha256")
            except OSError as exc:
                problems.append(f"{name}@{version}: {fname} cannot be read ({os_problem(exc)})")
        extra = sorted(p.name for p in folder.iterdir() if p.name not in entry["files"]) if folder.is_dir() else []
        problems += [f"{name}@{version}: unexpected file {f}" for f in extra]
        if not problems:  # the files are the published ones: the entry must then describe them
            problems += [f"{name}@{version}: {p}" for p in entry_problems(entry, folder)]
        return problems

    def location(self, name: str, version: str) -> str:
        """Where a version lives, for naming it (nothing is read, fetched or verified: `path` does that)."""
        return f"{self.root}/{name}/{version}"

    def path(self, ref: str) -> Path:
        """The verified folder of a version: every file re-hashed before it is handed out."""
        return self.verified(*self.resolve(ref))

    def verified(self, name: str, version: str, entry: dict) -> Path:
        """The folder of the version `resolve` gave, every file re-hashed against `entry`: for a caller that needs the entry
        too (its hashes), so that both are of one version even if a publish moves `latest` meanwhile."""
        problems = self._check_files(name, version, entry)
        if problems:
            raise RegistryError(f"integrity check failed for {name}@{version}: {'; '.join(problems)}; re-publish it or pull another version")
        return self._folder(name, version)

    def pull(self, ref: str, to: str | Path) -> Path:
        """Copy a verified version to a new folder (atomically: temp folder, then rename; nothing left on failure).

        The copy is hashed as it is written and must match the index too: the check before it does not cover
        bytes that changed between the check and the copy, and the copy is what the user will load.
        """
        name, version, entry = self.resolve(ref)  # once: `latest` may move meanwhile, and the copy is checked against this entry
        src, to = self.verified(name, version, entry), Path(to)
        if to.exists() or to.is_symlink():
            raise RegistryError(f"destination {str(to)!r} already exists; choose a new --to folder")
        under = next((q for q in to.parents if q.exists()), None)  # said here: mkdir's EEXIST would read as a disk problem
        if under is not None and not under.is_dir():
            raise RegistryError(f"--to {str(to)!r}: {str(under)!r} is a file, not a folder; choose a --to under a folder")
        if isinstance(self.root, Path) and self.root.resolve() in to.resolve().parents:  # an unlisted folder in the registry
            raise RegistryError(f"--to {str(to)!r} is inside registry {str(self.root)!r}; pull copies a version out: choose a --to outside it")
        tmp = temp_beside(to, "pull")  # clears the temps of pulls to this folder killed mid-copy
        try:
            to.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            copied = {f: copy_hashing(src / f, tmp / f) for f in sorted(entry["files"])}
            changed = sorted(f for f, rec in copied.items() if rec != {"sha256": entry["files"][f]["sha256"], "size": entry["files"][f]["size"]})
            if changed:
                raise RegistryError(f"integrity check failed for {name}@{version}: {', '.join(changed)} changed while it was copied "
                                    "(the copy does not match its recorded sha256); nothing was pulled: pull again, or re-publish it")
            try:
                tmp.rename(to)
            except OSError:
                if to.exists():  # another writer's folder: its OSError ("Directory not empty") would read as a disk problem
                    raise RegistryError(f"destination {str(to)!r} was created while {ref} was copied (another pull to it?); it is left as it "
                                        "is and nothing was pulled: choose a new --to folder") from None
                raise
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RegistryError(f"cannot copy {ref} to {str(to)!r}: {os_problem(exc)}; free disk space or choose a writable --to folder") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return to


class LocalRegistry(Publisher, Registry):
    """A registry in a local folder (the project's `adapters/` by default); publish and reindex: publishing.Publisher."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._parsed: tuple | None = None  # (index.json's inode, size, mtime, its parsed index)

    def index(self) -> dict:
        """The parsed index, for reading (do not change it). Parsed again only when index.json changed (every write
        replaces the file, so its inode changes): a server with thousands of adapters reads it at every lookup."""
        if not self.root.is_dir():
            raise RegistryError(f"registry {str(self.root)!r} does not exist (no such folder); check --registry, or publish into it to create it")
        path = self.root / "index.json"
        try:
            st = path.stat() if path.is_file() and not path.is_symlink() else None
        except OSError:
            st = None
        key = None if st is None else (st.st_ino, st.st_size, st.st_mtime_ns)
        if key is not None and self._parsed is not None and self._parsed[0] == key:
            return self._parsed[1]
        index = self._read_index()
        self._parsed = None if key is None else (key, index)
        return index

    def _read_index(self) -> dict:
        """The index; none yet (an empty registry) only when no version folder exists either."""
        path = self.root / "index.json"
        if path.is_symlink() or (path.exists() and not path.is_file()):
            what = f"a symlink to {os.readlink(path)!r}" if path.is_symlink() else "not a regular file"
            raise RegistryError(f"{path} is {what}; the index must be a regular file: restore it from a backup, "
                                f"or rebuild it from the version folders with `adapterhub-lite reindex --registry {self.root}`")
        try:
            text = path.read_bytes() if path.is_file() else None
        except OSError as exc:
            raise RegistryError(f"cannot read {path}: {os_problem(exc)}; check its permissions") from None
        if text is None:
            self._refuse_adapter_folder()
            found = self._version_folders()
            if found:  # the index was lost, not never written: reading the registry as empty would forget (and overwrite) them
                shown = ", ".join(f"{n}@{v}" for n, v in found[:3]) + (f" (+{len(found) - 3} more)" if len(found) > 3 else "")
                raise RegistryError(f"registry {self.root} holds version folders ({shown}) but no index.json: restore it from a backup, "
                                    f"or rebuild it from the folders with `adapterhub-lite reindex --registry {self.root}`")
        return parse_index(text, str(path), fix="restore it from a backup (the version folders beside it are untouched), or rebuild it "
                           f"from them with `adapterhub-lite reindex --registry {self.root}`")

    def _refuse_adapter_folder(self) -> None:
        """An adapter folder given as the registry (runs/sst2, or a version folder <registry>/<name>/<version>) holds no
        index: read as an empty registry, `export` would say it "holds no adapters" and `list` would print none, and a
        publish would write a registry into the adapter's folder."""
        held = next((f for f in ("adapter_config.json", SIDECAR) if (self.root / f).is_file()), None)
        if held is None:
            return
        found = registered_as(self.root)
        if found is not None:
            raise RegistryError(f"registry {str(self.root)!r} is the version folder of {found[1]}@{found[2]} in registry "
                                f"{str(found[0].root)!r}, not a registry; pass --registry {found[0].root}")
        raise RegistryError(f"registry {str(self.root)!r} is an adapter folder (it holds {held}), not a registry; pass the registry folder "
                            f"that holds the adapter (default: adapters), or publish it into one first: "
                            f"`adapterhub-lite publish {self.root} --registry adapters`")

    def _version_folders(self) -> list[tuple[str, str]]:
        """(name, version) of every <name>/<version>/ folder that holds adapter files, listed or not."""
        found = []
        for folder in sorted(self.root.glob("*/*")):
            if folder.is_dir() and is_version_folder(folder.parent.name, folder.name) and any(
                    (folder / f).exists() for f in (SIDECAR, "adapter_config.json", "adapter_model.safetensors")):
                found.append((folder.parent.name, folder.name))
        return found

    def _folder(self, name: str, version: str) -> Path:
        return self.root / name / version

    def _check_files(self, name: str, version: str, entry: dict) -> list[str]:
        """The hashes, and no symlinks: a publish writes none, the server refuses a folder that holds any
        (folder.check_adapter_folder), and the bytes a link leads to can change outside the registry. (A Hub
        registry's version is downloaded as regular files into its own cache folder, hub.HubRegistry._folder.)"""
        folder = self._folder(name, version)
        links = [p for p in (folder.parent, folder) if p.is_symlink()] + [folder / f for f in sorted(entry["files"]) if (folder / f).is_symlink()]
        problems = [f"{name}@{version}: {p.relative_to(self.root).as_posix()} is a symlink to {os.readlink(p)!r}; "
                    "a registry holds its own files, so put the files in place of the link" for p in links]
        return problems + super()._check_files(name, version, entry)

def registered_as(folder: str | Path) -> tuple[LocalRegistry, str, str, dict] | None:
    """(registry, name, version, entry) when `folder` is a listed version folder <registry>/<name>/<version>/
    of a local registry; None when it is not (no index.json two levels up, or the index does not list it)."""
    folder = Path(folder).resolve()
    name, version, root = folder.parent.name, folder.name, folder.parent.parent
    if not (is_version_folder(name, version) and (root / "index.json").is_file()):
        return None
    reg = LocalRegistry(root)
    entry = reg.index()["adapters"].get(name, {}).get(version)  # a damaged index is refused, not skipped
    return None if entry is None else (reg, name, version, entry)


def check_if_registered(folder: str | Path) -> str | None:
    """Re-hash a folder that sits in a registry against its index entry, however it is reached.

    Loading `<registry>/<name>/<version>` by path must be as safe as loading `name@version`:
    raise RegistryError on any mismatch; return "name@version" when checked, None when the
    folder is not a listed registry version (nothing to check against).
    """
    found = registered_as(folder)
    if found is None:
        return None
    reg, name, version, entry = found
    problems = reg._check_files(name, version, entry)
    if problems:
        raise RegistryError(f"integrity check failed for {name}@{version} in registry {reg.root}: {'; '.join(problems)}; "
                            "re-publish it or pull another version")
    return f"{name}@{version}"

