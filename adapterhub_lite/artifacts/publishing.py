"""The write side of a local registry: publish and reindex, under the registry's file lock.

Publishing copies into a hidden temp folder (hashing as it copies), fsyncs, and then, under a file lock,
renames the folder into place and rewrites the index atomically. A publisher killed at any
point leaves the old index and at most an unlisted folder, named in `.placing.json`, which the
next publish clears away; an unlisted folder that file does not name is someone's, and refused.

The lock is `filelock.FileLock` (fcntl on POSIX, msvcrt on Windows; imported only when a publish
takes it). A publisher's temp folder is named `.publish-<id>-<pid>-<host>`: a later publisher
clears it when that pid is gone on its own host, and, whatever the host, once it is older than a
day (a pid means nothing on another host of a shared NFS registry).

The reading side (resolve, verify, pull, the index read) is registry.py's; LocalRegistry takes this as a mixin.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from adapterhub_lite.artifacts.files import atomic_write, open_lock_file, os_problem, owner, sweep_stale, write_json
from adapterhub_lite.artifacts.index import (
    INDEX_FORMAT,
    RegistryError,
    check_case_clash,
    check_copy,
    check_folder,
    check_same_base,
    file_record,
    is_version_folder,
    make_entry,
    next_version,
    publish_inputs,
    unlisted_folder,
)
from adapterhub_lite.core.errors import AdapterHubError

LOCK_TIMEOUT_S = 600
PLACING = ".placing.json"  # {"name", "version"}: the folder a publisher renames into place before it lists it


def copy_hashing(src: Path, dst: Path) -> dict:
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


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in the folder `path` durable (its entry, not only the file's bytes)."""
    if os.name == "nt":  # Windows cannot open a folder to fsync it; NTFS journals the rename itself
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Publisher:
    """Publishing into, and rebuilding the index of, a local registry (a mixin of registry.LocalRegistry, which holds
    `root` and reads the index: `_read_index`, `_refuse_adapter_folder`, `_version_folders`)."""

    root: Path

    def reindex(self) -> dict:
        """Rebuild a missing or damaged index.json from the version folders' own files and sidecars.

        Every folder passes the publish checks first (or nothing is written, and every problem is
        named); the damaged index, if any, is kept beside as index.json.damaged-<time>. The rebuilt
        index records each file as it is now: a change made before the rebuild cannot be detected.
        """
        path = self.root / "index.json"
        if not self.root.is_dir():
            raise RegistryError(f"registry {str(self.root)!r} does not exist (no such folder); check --registry")
        with self._locked():
            try:
                readable = path.is_file() and not path.is_symlink() and bool(self._read_index())
            except RegistryError:
                readable = False
            if readable:
                raise RegistryError(f"{path} is readable; reindex only rebuilds a missing or damaged index (`adapterhub-lite verify` checks this one)")
            adapters, problems = {}, []
            for name, version in self._version_folders():
                folder = self.root / name / version
                try:
                    meta = check_folder(folder)
                    files = {p.name: file_record(p) for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}
                    peft_config = json.loads((folder / "adapter_config.json").read_text())
                    adapters.setdefault(name, {})[version] = make_entry(meta, peft_config, files, created=meta.get("created"))
                except (AdapterHubError, OSError, ValueError) as exc:
                    problems.append(f"{name}@{version}: {exc}")
            if problems:
                raise RegistryError(f"cannot rebuild {path}: {'; '.join(problems)}; move those folders out of the registry, then reindex again")
            if not adapters:
                raise RegistryError(f"registry {self.root} holds no version folders to index")
            index = {"format": INDEX_FORMAT, "adapters": adapters}
            if path.is_symlink() or path.exists():
                os.replace(path, path.with_name(f"index.json.damaged-{time.strftime('%Y%m%dT%H%M%S')}"))
            write_json(path, index)
        return index

    @contextmanager
    def _locked(self):
        """The registry's write lock (an OS lock: released when the holder dies, also by SIGKILL)."""
        from filelock import FileLock, Timeout  # imported here: `import adapterhub_lite` stays free of fcntl/msvcrt

        try:
            open_lock_file(self.root / ".lock")
        except OSError as exc:
            raise RegistryError(f"registry {str(self.root)!r} cannot be locked for writing: {os_problem(exc)}; "
                                "check the registry folder's permissions (its .lock must be writable by this user)") from None
        lock = FileLock(str(self.root / ".lock"), timeout=LOCK_TIMEOUT_S)
        try:
            lock.acquire()
        except Timeout:
            raise RegistryError(f"registry {self.root} stayed locked by another publisher for {LOCK_TIMEOUT_S} s; "
                                "retry, or check for a hung publisher") from None
        try:
            yield
        finally:
            lock.release()

    def _sweep(self) -> None:
        """Remove temp folders of dead publishers and temp index files of killed writers; call under the lock.

        A folder of this host whose pid is gone is dead; another host's (NFS) go after STALE_SECONDS (files.sweep_stale).
        """
        sweep_stale(self.root, ".publish-")
        for tmp in self.root.glob(".index.json.*"):  # atomic_write's temp index of a writer killed mid-write: the index
            tmp.unlink(missing_ok=True)  # is written only under this lock, so none of these is being written now
        placing = self.root / PLACING  # written only under this lock too: its publisher was killed after its rename
        if placing.is_file() and not placing.is_symlink():
            try:
                left = json.loads(placing.read_text())
                name, version = str(left["name"]), str(left["version"])
            except (OSError, ValueError, KeyError, TypeError):
                name = version = ""
            folder = self.root / name / version
            if is_version_folder(name, version) and version not in self._read_index()["adapters"].get(name, {}) and folder.is_dir() \
                    and not folder.is_symlink():
                shutil.rmtree(folder)  # never listed, never seen: that publisher's own copy, not a user's folder
            placing.unlink()

    def publish(self, folder: str | Path, version: str = "auto", name: str | None = None, allow_base_change: bool = False) -> tuple[str, str, dict]:
        """Copy an adapter folder in as an immutable version; returns (name, version, entry). A version trained on
        another backbone than the name's latest is refused unless `allow_base_change` (index.check_same_base).

        A failure on the way (disk full, read-only registry) is one RegistryError and leaves the
        registry as it was: the temp folder is removed, and a folder renamed into place but not
        yet listed is taken back.
        """
        folder, meta, name, peft_config = publish_inputs(folder, version, name)
        if not (self.root / "index.json").exists():
            self._refuse_adapter_folder()  # before its .lock and temp folder are made in it
        tmp = self.root / f".publish-{uuid.uuid4().hex[:8]}-{owner()}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            files = {p.name: copy_hashing(p, tmp / p.name) for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}
            fsync_dir(tmp)
            # the checks again, on the copy: what is published is these bytes, not those checked before (a run still
            # writing the folder, a sidecar replaced meanwhile); the entry is made from them too
            meta, peft_config = check_copy(folder, tmp)
            with self._locked():
                self._sweep()
                index = self._read_index()
                check_case_clash(index["adapters"], name)
                versions = index["adapters"].setdefault(name, {})
                version = next_version(versions, version, name)
                entry = make_entry(meta, peft_config, files)
                check_same_base(versions, entry, name, allow_base_change)
                final = self.root / name / version
                if final.exists() or final.is_symlink():  # a killed publisher's was cleared by the sweep: someone put this here
                    raise unlisted_folder(str(self.root), name, version)
                atomic_write(self.root / PLACING, json.dumps({"name": name, "version": version}))  # see _sweep
                final.parent.mkdir(exist_ok=True)
                tmp.rename(final)
                try:
                    fsync_dir(final.parent)
                    versions[version] = entry
                    write_json(self.root / "index.json", index)
                except BaseException:
                    shutil.rmtree(final, ignore_errors=True)  # not listed: take it back, the old index stands
                    raise
                finally:
                    (self.root / PLACING).unlink(missing_ok=True)
        except OSError as exc:
            raise RegistryError(f"cannot publish {str(folder)!r} into registry {self.root}: {os_problem(exc)}; "
                                "free disk space or make the registry writable, then publish again (the registry is unchanged)") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return name, version, entry
