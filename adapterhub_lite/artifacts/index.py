"""The registry's index format: names, versions and references, file records, and the entry of one version.

    <registry>/index.json    {"format": "adapterhub_lite.registry/1", "adapters": {name: {version: entry}}}

An entry records what a version is (task, type, method, rank, targets, backbone and its quantization, the task's
metrics) and the sha256 and size of each of its files; `parse_index` refuses an index whose structure is damaged,
naming every problem. Every registry kind (registry.LocalRegistry, hub.HubRegistry) reads and writes this one
format; how a folder gets published into it is publishing.py's, the integrity checks on the way out registry.py's.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

from adapterhub_lite.artifacts.folder import SIDECAR, check_adapter_folder, read_sidecar
from adapterhub_lite.core.errors import AdapterHubError
from adapterhub_lite.model.lora_format import with_peft_defaults

INDEX_FORMAT = "adapterhub_lite.registry/1"
# Always used with fullmatch: `$` would also match before a trailing newline ("1.0.0\n").
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_VERSION = re.compile(r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)")
_SHA256 = re.compile(r"[0-9a-f]{64}")
ENTRY_KEYS = ("task", "type", "method", "base", "quantization", "metrics", "files")


class RegistryError(AdapterHubError):
    """A registry operation was refused: bad name or version, unknown entry, failed integrity check."""


def check_name(name: str) -> str:
    """Adapter names are one path component: letters, digits, '.', '_', '-'; no '..'."""
    if isinstance(name, str) and len(name) > 100 and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) and ".." not in name:
        raise RegistryError(f"invalid adapter name {name[:40] + '…'!r} ({len(name)} characters): names are at most 100 characters "
                            "(a folder's name on every file system); give a shorter one")
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise RegistryError(f"invalid adapter name {name!r}: use letters, digits, '.', '_' and '-' (no path separators, no '..')")
    return name


# Windows' device names: a folder named so (any case, any extension: "nul.x") is the device, so a publish into it would
# write its files nowhere; and a trailing '.' is dropped there, so "toy." would land in toy's folder.
_DEVICE = re.compile(r"(con|prn|aux|nul|com[0-9]|lpt[0-9])(\..*)?", re.IGNORECASE)


def check_portable(name: str, fix: str = "publish it under another name (--name)") -> str:
    """A new name must be a folder on every system a registry is read on (a shared or synced folder, a Hub registry
    pulled on Windows): refused here at publish only, so a registry that already holds such a name stays readable."""
    if _DEVICE.fullmatch(name) or name.endswith("."):
        why = "ends in '.', which Windows drops" if name.endswith(".") else "is a Windows device name, not a folder there"
        raise RegistryError(f"invalid adapter name {name!r}: it {why}; {fix}")
    return name


def check_version(version: str, other: str = "'auto'") -> str:
    """Versions are semantic MAJOR.MINOR.PATCH, matched whole (no sign, no leading zeros, no whitespace, no pre-release
    or build suffix); `other` is the word the caller also takes in its place (publish: 'auto', a reference: 'latest')."""
    if not isinstance(version, str) or not _VERSION.fullmatch(version):
        raise RegistryError(f"invalid version {version!r}: use semantic MAJOR.MINOR.PATCH such as 1.0.0 (no pre-release or build "
                            f"suffix such as -rc1), or {other}")
    return version


def version_key(version: str) -> tuple[int, ...]:
    """A MAJOR.MINOR.PATCH version as a tuple that sorts as versions do (1.10.0 after 1.9.0)."""
    return tuple(int(x) for x in version.split("."))


def parse_ref(ref: str) -> tuple[str, str]:
    """'sst2', 'sst2@latest' or 'sst2@1.0.0' → (name, version or 'latest')."""
    name, at, version = ref.partition("@")
    check_name(name)
    if at and not version:  # "sst2@" is a version left out by mistake, not a request for the latest
        raise RegistryError(f"{ref!r} names an empty version after '@'; give {name}@MAJOR.MINOR.PATCH, {name}@latest, "
                            f"or {name!r} alone for its latest version")
    version = version or "latest"
    # in a reference the other word is 'latest': 'auto' is publish's, and offering it here would refuse the fix it names
    return name, version if version == "latest" else check_version(version, f"'latest' ({name}@latest)")


def is_version_folder(name: str, version: str) -> bool:
    """Whether <name>/<version> is shaped as a version folder: a name and a MAJOR.MINOR.PATCH version, matched whole."""
    return bool(_NAME.fullmatch(name) and _VERSION.fullmatch(version))


def hash_file(path: Path) -> str:
    """The sha256 of a file's bytes (hex), read 1 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_record(path: Path) -> dict:
    """sha256 and size of one file, as the index records them."""
    return {"sha256": hash_file(path), "size": path.stat().st_size}


def check_folder(folder: Path) -> dict:
    """Refuse folders that are not safetensors adapters (folder.check_adapter_folder, as every way in); return their sidecar."""
    return check_adapter_folder(folder, RegistryError)


def publish_inputs(folder: str | Path, version: str, name: str | None) -> tuple[Path, dict, str, dict]:
    """What every registry checks before a publish: (folder, its sidecar, the name to publish under, adapter_config)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RegistryError(f"adapter folder {str(folder)!r} does not exist")
    meta = check_folder(folder)
    if name is not None:
        name = check_portable(check_name(name))  # an empty --name is refused, not read as "no name"
    else:  # the sidecar's name, one the user never typed (a merge takes its --output folder's): say where it came from
        name, origin = meta["name"], f"that is the name {folder / SIDECAR} records: publish it under another with --name"
        try:
            check_name(name)
        except RegistryError as exc:
            raise RegistryError(f"{exc}; {origin}") from None
        check_portable(name, fix=origin)
    if version != "auto":
        check_version(version)
        if len(version) > 100:  # a folder name: past 255 bytes mkdir fails, and its OSError reads as a disk problem ("free disk space")
            raise RegistryError(f"invalid version {version[:40] + '…'!r} ({len(version)} characters): at most 100; use smaller numbers")
    return folder, meta, name, json.loads((folder / "adapter_config.json").read_text())


def check_copy(folder: Path, copy: Path) -> tuple[dict, dict]:
    """publish's checks again, on the copy it made of `folder` (what gets published: a run still writing the folder, or
    a sidecar replaced, between the first checks and the copy is caught here); returns (sidecar, adapter_config)."""
    try:
        return check_folder(copy), json.loads((copy / "adapter_config.json").read_text())
    except (AdapterHubError, OSError, ValueError) as exc:
        raise RegistryError(f"{str(folder)!r} changed while it was copied, and the copy fails the publish checks "
                            f"({str(exc).replace(str(copy), 'the copy')}); publish it again once nothing writes to it") from None


def make_entry(meta: dict, peft_config: dict, files: dict, created: str | None = None) -> dict:
    """The index record of one version (`created`: when it was published; default now)."""
    try:
        spec, fp = meta["task"] or {"name": None, "type": "component", "metric": []}, meta["base"]["fingerprint"]  # no task: a shared adapter
        if peft_config.get("peft_type") == "LORA" and "r" not in peft_config:
            # a left-out r is peft's default (8), as PeftModel.from_pretrained loads it; peft is imported for that case alone
            # (its import costs the light commands seconds)
            peft_config = with_peft_defaults(peft_config, "adapter_config.json", RegistryError)
        targets = peft_config.get("target_modules")
        metrics = meta.get("metrics") or {}
        return {
            "task": spec["name"], "type": spec["type"], "method": meta["method"],
            "rank": peft_config.get("r"), "num_virtual_tokens": peft_config.get("num_virtual_tokens"),
            "target_modules": sorted(targets) if isinstance(targets, list) else targets,
            "base": {"name": meta["base"]["name"], "hub_id": meta["base"]["hub_id"], "fingerprint": fp},
            "quantization": fp["quantization"],
            "metrics": {k: metrics[k] for k in spec["metric"] if k in metrics},  # the task's own metrics (a merge may have none)
            "files": files,
            "created": created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    except (KeyError, TypeError) as exc:
        raise RegistryError(f"the adapter's sidecar ({SIDECAR}) lacks {exc} or has it in the wrong form; publish a folder written by adapterhub-lite") from None


def entry_problems(entry: dict, folder: Path) -> list[str]:
    """What an index entry says of a version that the version's own files (their hashes already matched) do not:
    `list`, `info`, `export` and the Router's choice of backbone read the entry, so an entry edited by hand (its
    metrics, quantization, base …) would be shown and acted on though every file verifies. Fields an older entry
    lacks are not asked for; `files` and `created` are the index's own."""
    try:
        derived = make_entry(read_sidecar(folder), json.loads((folder / "adapter_config.json").read_text()), entry["files"])
    except (AdapterHubError, OSError, ValueError, RecursionError) as exc:
        return [f"its files cannot be read back as the entry ({type(exc).__name__}: {exc})"]  # whole: its fix is at its end
    said = {k: entry[k] for k in derived if k not in ("files", "created") and k in entry}
    return [f"index.json says {key} {a!r} but the version's files say {b!r}" for key, a, b in _differences(said, derived)]


def _differences(said, found, where: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, said, found) of each leaf where `said` differs from `found`: one changed field of a nested entry
    (base.fingerprint.quantization) is named alone, not as the whole object."""
    if isinstance(said, dict) and isinstance(found, dict):
        return [d for k in said for d in _differences(said[k], found.get(k), f"{where}.{k}" if where else k)]
    return [] if said == found else [(where, said, found)]


def check_case_clash(adapters: dict, name: str) -> None:
    """Refuse a new name that differs from a published one only by case (Toy beside toy): on a case-insensitive file
    system (macOS, Windows) both are one folder, and a publish would clear the other's version folder as a leftover."""
    clash = sorted(n for n in adapters if n != name and n.casefold() == name.casefold())
    if clash:
        raise RegistryError(f"adapter name {name!r} differs from the published {clash[0]!r} only by case, and a case-insensitive file "
                            f"system holds both in one folder; publish it as {clash[0]!r} (--name {clash[0]}) or under another name")


def next_version(versions: dict, version: str, name: str | None = None) -> str:
    """Resolve 'auto' (bump the patch of the latest, or 1.0.0) and refuse re-publishing `name`'s versions."""
    latest = max(versions, key=version_key, default=None)
    bumped = "1.0.0" if latest is None else ".".join(map(str, (*version_key(latest)[:2], version_key(latest)[2] + 1)))
    if version == "auto":
        version = bumped
    if version in versions:
        which = f"{name}@{version}" if name else f"version {version}"
        raise RegistryError(f"{which} is already published and versions are immutable (publish has no --overwrite); publish this "
                            f"folder as a new version: --version auto (gives {bumped}) or another --version MAJOR.MINOR.PATCH")
    return version


BACKBONE_KEYS = ("config_sha256", "tokenizer_sha256", "weights_sha256")  # what makes two backbones one (the quantization aside)


def check_same_base(versions: dict, entry: dict, name: str, allow_base_change: bool) -> None:
    """Refuse a new version of `name` trained on another backbone than its latest version, unless `allow_base_change`.

    `name` (latest) is what clients ask for: a version on another backbone moves every one of them to it, and a server
    of the old backbone then lists the name as unavailable. That may be meant (a task moved to a new base model), so it
    is allowed when said; a quantization of the same weights is the same backbone (QLoRA practice).
    """
    latest = max(versions, key=version_key, default=None)
    if latest is None or allow_base_change:
        return
    was, new = versions[latest]["base"], entry["base"]
    if any(was["fingerprint"].get(k) != new["fingerprint"].get(k) for k in BACKBONE_KEYS):
        raise RegistryError(f"{name}@{latest} (its latest version) was trained on backbone {was['fingerprint'].get('id') or was['name']} but this "
                            f"folder on {new['fingerprint'].get('id') or new['name']}: every client of {name!r} would move to the new backbone, "
                            "and a server of the old one would list it unavailable; publish it under another name (--name), or pass "
                            f"--allow-base-change to move {name!r} to the new backbone")


def unlisted_folder(root: str, name: str, version: str) -> RegistryError:
    """The refusal of a publish whose version folder is there already but not in the index: a hand copy, a folder left by
    a publish killed before its index was written (with no record of it), files uploaded to the Hub by hand. Its files
    may be someone's only copy, and what a pull of the new version would hand out: neither replaced nor merged into."""
    return RegistryError(f"registry {root} already holds a folder {name}/{version}/ that its index does not list (copied in by hand, or left "
                         "by a killed publish); nothing was published and the folder is untouched: move it out of the registry, then "
                         "publish again, or give another --version (auto chooses this one again: it follows the listed versions)")


def _index_problems(index: dict) -> list[str]:
    """What is wrong with a parsed index's structure (empty: nothing)."""
    adapters = index.get("adapters")
    if not isinstance(adapters, dict):
        return [f"'adapters' is {type(adapters).__name__ if 'adapters' in index else 'missing'}, expected an object {{name: {{version: entry}}}}"]
    problems = []
    for name, versions in adapters.items():
        if not _NAME.fullmatch(name) or ".." in name:
            problems.append(f"adapter name {name!r} is not a valid name")
        if not isinstance(versions, dict):
            problems.append(f"{name!r} maps to a {type(versions).__name__}, expected an object {{version: entry}}")
            continue
        for version, entry in versions.items():
            where = f"{name}@{version}"
            if not _VERSION.fullmatch(version):
                problems.append(f"{name!r} has version key {version!r}, not MAJOR.MINOR.PATCH")
            if not isinstance(entry, dict):
                problems.append(f"{where} is a {type(entry).__name__}, expected an object")
                continue
            missing = [k for k in ENTRY_KEYS if k not in entry]
            if missing:
                problems.append(f"{where} lacks {', '.join(missing)}")
                continue
            files = entry["files"]
            if not isinstance(files, dict) or not files:
                problems.append(f"{where} has no file records")
                continue
            for fname, rec in files.items():
                if Path(fname).name != fname or fname in (".", ".."):
                    problems.append(f"{where} lists file {fname!r}, not a plain file name")
                elif not (isinstance(rec, dict) and isinstance(rec.get("sha256"), str) and _SHA256.fullmatch(rec["sha256"])
                          and isinstance(rec.get("size"), int) and rec["size"] >= 0):
                    problems.append(f"{where}: the record of {fname} is not {{sha256: 64 hex digits, size: bytes}}")
            if not isinstance(entry["base"], dict) or not isinstance(entry["metrics"], dict):
                problems.append(f"{where}: 'base' and 'metrics' must be objects")
            elif not (isinstance(entry["base"].get("name"), str) and entry["base"]["name"]) or not isinstance(entry["base"].get("hub_id"), (str, type(None))):
                problems.append(f"{where}: 'base' lacks the backbone's name (or has a hub_id that is not a string)")
    return problems


def parse_index(text: str | bytes | None, where: str, fix: str | None = None) -> dict:
    """Parse and check an index.json (None: no index yet, an empty registry); a damaged one is one RegistryError
    ending in `fix` (a local registry names reindex there)."""
    if text is None:
        return {"format": INDEX_FORMAT, "adapters": {}}
    fix = fix or "restore it from a backup (the version folders beside it are untouched) or publish into a new registry"
    try:
        index = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bytes that are not UTF-8, an int of 5,000 digits, 100,000 nested brackets
        raise RegistryError(f"{where} is not valid JSON ({type(exc).__name__}: {str(exc)[:80]}); {fix}") from None
    if not isinstance(index, dict):
        raise RegistryError(f"{where} holds a JSON {type(index).__name__}, expected an object with 'format' and 'adapters'; {fix}")
    if index.get("format") != INDEX_FORMAT:
        raise RegistryError(f"{where} has format {index.get('format')!r}, expected {INDEX_FORMAT!r}; {fix}")
    problems = _index_problems(index)
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise RegistryError(f"{where} is damaged: {'; '.join(problems[:3])}{more}; {fix}")
    return index
