"""Registry: publish, list, pull, verify and load versioned adapters, with integrity checks.

Layout (a local folder; `hf://org/repo` keeps the same layout on the Hugging Face Hub):

    <registry>/index.json                 {"format": …, "adapters": {name: {version: entry}}}
    <registry>/<name>/<version>/          the adapter folder: PEFT files, sidecar, model card …

The index is the truth: a version exists when, and only when, the index lists it. Publishing
copies into a hidden temp folder (hashing as it copies), fsyncs, and then, under a file lock,
renames the folder into place and rewrites the index atomically. A publisher killed at any
point leaves the old index and at most an unlisted folder, which the next publish clears away.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from .errors import AdapterHubError
from .folder import read_sidecar, write_json

INDEX_FORMAT = "adapterhub_lite.registry/1"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_VERSION = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$")


class RegistryError(AdapterHubError):
    """A registry operation was refused: bad name or version, unknown entry, failed integrity check."""


def check_name(name: str) -> str:
    """Adapter names are one path component: letters, digits, '.', '_', '-'; no '..'."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise RegistryError(f"invalid adapter name {name!r}: use letters, digits, '.', '_' and '-' (no path separators, no '..')")
    return name


def check_version(version: str) -> str:
    if not isinstance(version, str) or not _VERSION.match(version):
        raise RegistryError(f"invalid version {version!r}: use semantic MAJOR.MINOR.PATCH such as 1.0.0, or 'auto'")
    return version


def _vkey(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in version.split("."))


def parse_ref(ref: str) -> tuple[str, str]:
    """'sst2', 'sst2@latest' or 'sst2@1.0.0' → (name, version or 'latest')."""
    name, _, version = ref.partition("@")
    check_name(name)
    version = version or "latest"
    return name, version if version == "latest" else check_version(version)


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_record(path: Path) -> dict:
    """sha256 and size of one file, as the index records them."""
    return {"sha256": _hash_file(path), "size": path.stat().st_size}


def _copy_hashing(src: Path, dst: Path) -> dict:
    """Copy one file, hashing it on the way, and fsync the copy."""
    h, size = hashlib.sha256(), 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        for chunk in iter(lambda: fin.read(1 << 20), b""):
            h.update(chunk)
            fout.write(chunk)
            size += len(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return {"sha256": h.hexdigest(), "size": size}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_folder(folder: Path) -> dict:
    """Refuse folders that are not safetensors adapters; return their sidecar."""
    folder = Path(folder)
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise RegistryError(f"{folder} holds pickle weights {pickles}: only safetensors are accepted; run `adapterhub-lite convert {folder} --trust-pickle` if you trust the file")
    if not (folder / "adapter_model.safetensors").is_file():
        raise RegistryError(f"{folder} has no adapter_model.safetensors; publish a folder written by `adapterhub-lite train`")
    return read_sidecar(folder)


def make_entry(meta: dict, peft_config: dict, files: dict) -> dict:
    """The index record of one version."""
    spec, fp = meta["task"] or {"name": None, "type": "component", "metric": []}, meta["base"]["fingerprint"]  # no task: a shared adapter
    targets = peft_config.get("target_modules")
    return {
        "task": spec["name"], "type": spec["type"], "method": meta["method"],
        "rank": peft_config.get("r"), "num_virtual_tokens": peft_config.get("num_virtual_tokens"),
        "target_modules": sorted(targets) if isinstance(targets, list) else targets,
        "base": {"name": meta["base"]["name"], "hub_id": meta["base"]["hub_id"], "fingerprint": fp},
        "quantization": fp["quantization"],
        "metrics": {k: meta["metrics"][k] for k in spec["metric"]},  # the task's own metrics
        "files": files,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def next_version(versions: dict, version: str) -> str:
    """Resolve 'auto' (bump the patch of the latest, or 1.0.0) and refuse re-publishing."""
    if version == "auto":
        latest = max(versions, key=_vkey, default=None)
        version = "1.0.0" if latest is None else ".".join(map(str, (*_vkey(latest)[:2], _vkey(latest)[2] + 1)))
    if version in versions:
        raise RegistryError(f"version {version} is already published and versions are immutable; publish with --version auto or a new version")
    return version


def parse_index(text: str | None, where: str) -> dict:
    if text is None:
        return {"format": INDEX_FORMAT, "adapters": {}}
    index = json.loads(text)
    if index.get("format") != INDEX_FORMAT:
        raise RegistryError(f"{where} has format {index.get('format')!r}, expected {INDEX_FORMAT!r}")
    return index


class Registry:
    """What every registry kind shares: resolving references, listing, verifying, pulling.

    Subclasses provide `index()`, `publish()` and `_folder(name, version)` (a local folder
    holding that version's files).
    """

    root: object

    def index(self) -> dict:
        raise NotImplementedError

    def _folder(self, name: str, version: str) -> Path:
        raise NotImplementedError

    def resolve(self, ref: str) -> tuple[str, str, dict]:
        """Find (name, version, entry) for a reference such as sst2@latest."""
        name, version = parse_ref(ref)
        versions = self.index()["adapters"].get(name)
        if not versions:
            known = ", ".join(sorted(self.index()["adapters"])) or "none"
            raise RegistryError(f"no adapter {name!r} in registry {self.root} (known: {known})")
        if version == "latest":
            version = max(versions, key=_vkey)
        if version not in versions:
            raise RegistryError(f"no version {version!r} of {name!r} in {self.root} (versions: {', '.join(sorted(versions, key=_vkey))})")
        return name, version, versions[version]

    def rows(self) -> list[dict]:
        """One row per version, for `list`."""
        out = []
        for name, versions in sorted(self.index()["adapters"].items()):
            for version in sorted(versions, key=_vkey):
                e = versions[version]
                out.append({"name": name, "version": version, "task": e["task"], "type": e["type"], "method": e["method"],
                            "rank": e.get("rank"), "base": e["base"]["hub_id"], "quantization": e["quantization"],
                            "metrics": e["metrics"]})
        return out

    def verify(self, name: str | None = None) -> list[str]:
        """Re-hash every file of every version (of one name); return the problems found."""
        problems = []
        for n, versions in sorted(self.index()["adapters"].items()):
            if name is not None and n != check_name(name):
                continue
            for version, entry in sorted(versions.items()):
                problems += self._check_files(n, version, entry)
        if name is not None and name not in self.index()["adapters"]:
            problems.append(f"no adapter {name!r} in registry {self.root}")
        return problems

    def _check_files(self, name: str, version: str, entry: dict) -> list[str]:
        folder = self._folder(name, version)
        problems = []
        for fname, want in sorted(entry["files"].items()):
            path = folder / fname
            if not path.is_file():
                problems.append(f"{name}@{version}: {fname} is missing")
            elif path.stat().st_size != want["size"] or _hash_file(path) != want["sha256"]:
                problems.append(f"{name}@{version}: {fname} does not match its recorded sha256")
        extra = sorted(p.name for p in folder.iterdir() if p.name not in entry["files"]) if folder.is_dir() else []
        problems += [f"{name}@{version}: unexpected file {f}" for f in extra]
        return problems

    def path(self, ref: str) -> Path:
        """The verified folder of a version: every file re-hashed before it is handed out."""
        name, version, entry = self.resolve(ref)
        problems = self._check_files(name, version, entry)
        if problems:
            raise RegistryError(f"integrity check failed for {name}@{version}: {'; '.join(problems)}; re-publish it or pull another version")
        return self._folder(name, version)

    def pull(self, ref: str, to: str | Path) -> Path:
        """Copy a verified version to a new folder (atomically: temp folder, then rename)."""
        src, to = self.path(ref), Path(to)
        if to.exists():
            raise RegistryError(f"destination {str(to)!r} already exists; choose a new --to folder")
        to.parent.mkdir(parents=True, exist_ok=True)
        tmp = to.with_name(f".{to.name}.pull-{uuid.uuid4().hex}")
        shutil.copytree(src, tmp)
        tmp.rename(to)
        return to

    def load(self, ref: str, **kwargs):
        """Verify, then load a version onto its backbone (see folder.load_adapter)."""
        from .folder import load_adapter

        return load_adapter(self.path(ref), **kwargs)


class LocalRegistry(Registry):
    """A registry in a local folder (the project's `adapters/` by default)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def index(self) -> dict:
        path = self.root / "index.json"
        return parse_index(path.read_text() if path.is_file() else None, str(path))

    def _folder(self, name: str, version: str) -> Path:
        return self.root / name / version

    @contextmanager
    def _locked(self):
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file closes, also if we are killed
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _sweep(self) -> None:
        """Remove temp folders of publishers that died (their pid is gone); call under the lock."""
        for tmp in self.root.glob(".publish-*"):
            pid = int(tmp.name.split("-")[1])
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                shutil.rmtree(tmp, ignore_errors=True)
            except PermissionError:
                pass  # alive, owned by someone else

    def publish(self, folder: str | Path, version: str = "auto", name: str | None = None) -> tuple[str, str, dict]:
        """Copy an adapter folder in as an immutable version; returns (name, version, entry)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise RegistryError(f"adapter folder {str(folder)!r} does not exist")
        meta = check_folder(folder)
        name = check_name(name or meta["name"])
        if version != "auto":
            check_version(version)
        peft_config = json.loads((folder / "adapter_config.json").read_text())
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".publish-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            files = {p.name: _copy_hashing(p, tmp / p.name) for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}
            _fsync_dir(tmp)
            with self._locked():
                self._sweep()
                index = self.index()
                versions = index["adapters"].setdefault(name, {})
                version = next_version(versions, version)
                final = self.root / name / version
                if final.exists():  # left by a publisher killed after its rename: never listed, so not visible
                    shutil.rmtree(final)
                final.parent.mkdir(exist_ok=True)
                tmp.rename(final)
                _fsync_dir(final.parent)
                versions[version] = entry = make_entry(meta, peft_config, files)
                write_json(self.root / "index.json", index)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return name, version, entry


def convert_pickle(folder: str | Path) -> Path:
    """Turn a trusted pickle adapter (adapter_model.bin) into adapter_model.safetensors, in place."""
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    src = folder / "adapter_model.bin"
    if not src.is_file():
        raise RegistryError(f"{folder} has no adapter_model.bin to convert")
    state = torch.load(src, map_location="cpu", weights_only=True)  # tensors only: no code runs
    tmp = folder / ".adapter_model.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / "adapter_model.safetensors")
    src.unlink()
    return folder / "adapter_model.safetensors"


def open_registry(location: str | Path):
    """A registry object for a local folder or an `hf://org/repo` address."""
    if str(location).startswith("hf://"):
        from .hub import HubRegistry

        return HubRegistry(str(location)[5:])
    return LocalRegistry(location)



def adapter_ref(ref: str | Path, registry: str | Path = "adapters") -> tuple[str, Path]:
    """An adapter given as a folder or as name[@version] in a registry: its name and (verified) folder."""
    if Path(ref).is_dir():
        return Path(ref).name, Path(ref)
    if "/" in str(ref) or Path(ref).exists():
        raise RegistryError(f"adapter folder {str(ref)!r} does not exist; pass an adapter folder or name[@version] in the {str(registry)!r} registry")
    return parse_ref(str(ref))[0], open_registry(registry).path(str(ref))
