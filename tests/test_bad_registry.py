"""A registry given bad input or a damaged, full or shared disk: one line (exit 2), nothing half-written."""

import errno
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

import adapterhub_lite.artifacts.files as files
import adapterhub_lite.artifacts.publishing as publishing
import adapterhub_lite.artifacts.registry as registry
from adapterhub_lite.artifacts.index import INDEX_FORMAT
from adapterhub_lite.artifacts.loading import load_adapter
from adapterhub_lite.artifacts.registries import adapter_ref
from adapterhub_lite.artifacts.registry import LocalRegistry, RegistryError, check_if_registered
from adapterhub_lite.cli import main

from .conftest import train_tiny


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("adapter"))


@pytest.fixture
def reg(adapter, tmp_path):
    """A registry holding toy@1.0.0."""
    LocalRegistry(tmp_path / "reg").publish(adapter, "1.0.0")
    return tmp_path / "reg"


def _one_line_error(capsys, *needles) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def _files(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name != ".lock")


@pytest.mark.parametrize("flag, value, needle", [
    ("--version", "1.0.0\n", "invalid version '1.0.0\\n'"),
    ("--version", " 1.0.0", "invalid version ' 1.0.0'"),
    ("--name", "toy\n", "invalid adapter name 'toy\\n'"),
])
def test_trailing_newlines_and_spaces_fail_the_name_and_version_checks(reg, adapter, capsys, flag, value, needle):
    before = _files(reg)
    assert main(["publish", str(adapter), "--registry", str(reg), flag, value]) == 2
    _one_line_error(capsys, needle)
    assert _files(reg) == before
    assert main(["info", f"toy@{value}" if flag == "--version" else value, "--registry", str(reg)]) == 2
    capsys.readouterr()


DAMAGED = {
    "truncated": lambda text: text[: len(text) // 2],
    "a list": lambda text: "[]",
    "no adapters": lambda text: json.dumps({"format": INDEX_FORMAT}),
    "no files": lambda text: text.replace('"files"', '"filez"'),
    "bad version key": lambda text: text.replace('"1.0.0"', '"1.x.0"'),
    "not utf-8": lambda text: "\udcff",
}
NEEDLES = {"truncated": "is not valid JSON", "a list": "holds a JSON list", "no adapters": "'adapters' is missing",
           "no files": "toy@1.0.0 lacks files", "bad version key": "has version key '1.x.0', not MAJOR.MINOR.PATCH",
           "not utf-8": "is not valid JSON"}


@pytest.mark.parametrize("damage", list(DAMAGED))
def test_a_damaged_index_is_one_line_from_every_registry_command(reg, adapter, tmp_path, capsys, damage):
    index = reg / "index.json"
    index.write_bytes(DAMAGED[damage](index.read_text()).encode("utf-8", "surrogateescape"))
    before = _files(reg)
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"adapter": "toy", "text": "pos 1"}\n')
    for argv in (["list"], ["info", "toy"], ["pull", "toy", "--to", str(tmp_path / "pulled")], ["verify"],
                 ["publish", str(adapter)], ["infer", "--input", str(requests)], ["merge", "toy", "--weights", "1", "--output", str(tmp_path / "m")]):
        assert main([*argv, "--registry", str(reg)]) == 2, argv
        _one_line_error(capsys, str(index), NEEDLES[damage], "restore it from a backup", f"adapterhub-lite reindex --registry {reg}")
    with pytest.raises(RegistryError, match=NEEDLES[damage]):
        load_adapter(LocalRegistry(reg).path("toy"))
    assert _files(reg) == before and not (tmp_path / "pulled").exists() and not (tmp_path / "m").exists()


def test_a_registry_that_does_not_exist_is_refused_not_listed_as_empty(tmp_path, capsys):
    for argv in (["list"], ["verify"], ["info", "toy"]):
        assert main([*argv, "--registry", str(tmp_path / "nonexistent")]) == 2
        _one_line_error(capsys, "does not exist")
    assert not (tmp_path / "nonexistent").exists()


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_registry_folder_loaded_by_its_path_is_re_hashed(reg, adapter, tmp_path):
    folder = reg / "toy" / "1.0.0"
    assert check_if_registered(folder) == "toy@1.0.0" and check_if_registered(adapter) is None
    assert adapter_ref(str(folder), reg)[0] == "toy"  # named by its adapter, not "1.0.0"
    shutil.copytree(folder, tmp_path / "copy")  # a copy outside the registry is an ordinary folder
    _flip_last_byte(folder / "adapter_model.safetensors")
    with pytest.raises(RegistryError, match=r"integrity check failed for toy@1.0.0 in registry .*adapter_model.safetensors does not match"):
        check_if_registered(folder)
    with pytest.raises(RegistryError, match="integrity check failed for toy@1.0.0"):
        adapter_ref(str(folder), reg)  # merge given the folder
    assert check_if_registered(tmp_path / "copy") is None


def test_serve_lists_the_pinned_id_of_a_damaged_version_unavailable_as_its_name(reg, adapter):
    """GET /v1/models: a name whose latest version fails its integrity check is `available: false`, and so is that
    version's own id (toy@1.1.0): a completion on either is refused (adapter_unavailable). Checked at start and after
    a reload that finds a newly published version damaged."""
    import asyncio
    from concurrent.futures import Future

    from adapterhub_lite.serving import protocol as P
    from adapterhub_lite.serving.router import Router
    from adapterhub_lite.serving.runtime import Catalogue

    class Engine:  # runs catalogue changes at once (the real engine runs them between two steps)
        def __init__(self, router):
            self.router = router

        def call(self, fn):
            fut = Future()
            fut.set_result(fn(self.router))
            return fut

        def in_use(self):
            return set()

        def wanted(self):
            return set()

    store = LocalRegistry(reg)
    store.publish(adapter, "1.1.0")
    store.publish(adapter, "1.0.0", name="other")
    _flip_last_byte(reg / "toy" / "1.1.0" / "adapter_model.safetensors")
    with pytest.warns(UserWarning, match="toy.*unavailable"):
        router = Router.from_registry(reg, quantization="none", dtype="fp32")
    catalogue = Catalogue(Engine(router))

    def cards():
        return {m["id"]: (m.get("available", True), m.get("unavailable_reason")) for m in catalogue.models()}
    seen = cards()
    assert seen["toy"][0] is False and "integrity check failed for toy@1.1.0" in seen["toy"][1]
    assert seen["toy@1.1.0"] == seen["toy"]
    assert seen["toy@1.0.0"] == seen["other"] == seen["other@1.0.0"] == (True, None)
    with pytest.raises(P.ApiError, match="integrity check failed for toy@1.1.0") as refused:
        asyncio.run(catalogue.ensure_known("toy@1.1.0"))
    assert refused.value.status == 503 and refused.value.code == "adapter_unavailable"

    store.publish(adapter, "1.1.0", name="other")
    _flip_last_byte(reg / "other" / "1.1.0" / "adapter_model.safetensors")
    assert asyncio.run(catalogue.reload())["unavailable"].keys() == {"toy", "other"}
    seen = cards()
    assert seen["other"][0] is False and seen["other@1.1.0"] == seen["other"] and "other@1.1.0" in seen["other"][1]
    assert seen["toy@1.1.0"][0] is False and seen["other@1.0.0"] == (True, None)

    for name in ("toy", "other"):  # the files restored: a reload serves both again, by name and by pinned id, and lists them so
        _flip_last_byte(reg / name / "1.1.0" / "adapter_model.safetensors")
    assert asyncio.run(catalogue.reload())["unavailable"] == {}
    assert {i: card for i, card in cards().items() if card != (True, None)} == {}
    assert asyncio.run(catalogue.ensure_known("toy@1.1.0")) == "toy@1.1.0"


def test_import_adapterhub_lite_imports_no_platform_lock_module():
    """fcntl does not exist on Windows: no module of ours may import it (the stdlib's subprocess does so only on POSIX)."""
    code = """
import builtins, sys
real = builtins.__import__
def guard(name, globals=None, *a, **k):
    if name in ("fcntl", "msvcrt") and (globals or {}).get("__name__", "").startswith("adapterhub_lite"):
        raise ImportError(f"{globals['__name__']} imports {name}")
    return real(name, globals, *a, **k)
builtins.__import__ = guard
import adapterhub_lite, adapterhub_lite.artifacts.registry, adapterhub_lite.artifacts.hub, adapterhub_lite.cli
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-500:]


def test_sweep_clears_dead_publishers_of_this_host_and_only_stale_ones_of_other_hosts(reg, adapter):
    host = files.host()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folders = {
        "mine, dead": f".publish-aaaa0001-{dead.pid}-{host}",
        "mine, alive": f".publish-aaaa0002-{os.getpid()}-{host}",
        "other host, fresh": f".publish-aaaa0003-{dead.pid}-some-other-host.example",
        "other host, stale": f".publish-aaaa0004-{dead.pid}-some-other-host.example",
        "old form, fresh": f".publish-{dead.pid}-aaaa0005",
    }
    for name in folders.values():
        (reg / name).mkdir()
        (reg / name / "adapter_model.safetensors").write_bytes(b"partial")
    old = time.time() - files.STALE_SECONDS - 60
    os.utime(reg / folders["other host, stale"], (old, old))
    LocalRegistry(reg).publish(adapter)  # sweeps under the lock
    left = {k for k, name in folders.items() if (reg / name).exists()}
    assert left == {"mine, alive", "other host, fresh", "old form, fresh"}


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["copy", "index"])
def test_a_full_disk_during_publish_is_one_line_and_leaves_the_registry_as_it_was(reg, adapter, capsys, monkeypatch, where):
    before, index = _files(reg), (reg / "index.json").read_text()
    if where == "copy":  # the second file fails to copy
        copy, calls = publishing.copy_hashing, []

        def failing(src, dst):
            calls.append(src)
            return _enospc() if len(calls) == 2 else copy(src, dst)
        monkeypatch.setattr(publishing, "copy_hashing", failing)
    else:  # the version folder is in place; writing the new index fails
        monkeypatch.setattr(os, "replace", _enospc)
    assert main(["publish", str(adapter), "--registry", str(reg), "--version", "1.0.1"]) == 2
    _one_line_error(capsys, "cannot publish", "No space left on device (ENOSPC)", "the registry is unchanged")
    monkeypatch.undo()
    assert _files(reg) == before and (reg / "index.json").read_text() == index
    assert LocalRegistry(reg).verify() == [] and LocalRegistry(reg).publish(adapter, "1.0.1")[1] == "1.0.1"


def test_a_read_only_registry_is_one_line(adapter, tmp_path, capsys, monkeypatch):
    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
    monkeypatch.setattr(registry.Path, "mkdir", read_only)
    assert main(["publish", str(adapter), "--registry", str(tmp_path / "reg")]) == 2
    _one_line_error(capsys, "Read-only file system (EROFS)")
    monkeypatch.undo()
    assert not (tmp_path / "reg").exists()


def test_a_lock_file_that_cannot_be_opened_is_named_not_waited_on(reg, adapter, capsys, monkeypatch):
    """filelock takes a .lock it cannot open (a folder in its place, another user's file) for one held by another
    publisher and waits LOCK_TIMEOUT_S (10 minutes) to say so; the OS's reason is said at once instead."""
    monkeypatch.setattr(publishing, "LOCK_TIMEOUT_S", 1)  # without the check: a 1 s wait, then "locked by another publisher"
    before = _files(reg)
    (reg / ".lock").unlink(missing_ok=True)
    (reg / ".lock").mkdir()
    assert main(["publish", str(adapter), "--registry", str(reg), "--version", "1.0.1"]) == 2
    _one_line_error(capsys, "cannot be locked for writing: Is a directory (EISDIR)")
    assert _files(reg) == before  # no version, no temp folder left


def test_a_full_disk_during_pull_leaves_nothing(reg, tmp_path, capsys, monkeypatch):
    def partial(src, dst):
        dst.write_text("{")  # half a copy, then the disk is full
        _enospc()
    monkeypatch.setattr(registry, "copy_hashing", partial)
    assert main(["pull", "toy", "--registry", str(reg), "--to", str(tmp_path / "out" / "toy")]) == 2
    _one_line_error(capsys, "cannot copy toy", "ENOSPC")
    assert list((tmp_path / "out").iterdir()) == []  # no partial copy, no temp folder


def test_pull_checks_the_bytes_it_copies_not_only_those_it_checked_before(reg, tmp_path, capsys, monkeypatch):
    """A file rewritten between pull's integrity check and its copy (a publisher on another host, a hand edit) was copied
    as it was then, unchecked; the copy is now hashed as it is written, and refused, leaving nothing."""
    check = LocalRegistry._check_files

    def then_rewritten(self, name, version, entry):
        problems = check(self, name, version, entry)
        weights = self.root / name / version / "adapter_model.safetensors"
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 1
        weights.write_bytes(bytes(data))
        return problems
    monkeypatch.setattr(LocalRegistry, "_check_files", then_rewritten)
    assert main(["pull", "toy@1.0.0", "--registry", str(reg), "--to", str(tmp_path / "out" / "toy")]) == 2
    _one_line_error(capsys, "integrity check failed for toy@1.0.0: adapter_model.safetensors changed while it was copied")
    assert list((tmp_path / "out").iterdir()) == []  # no copy, no temp folder


@pytest.mark.parametrize("link", ["toy/1.0.0/adapter_model.safetensors", "toy/1.0.0", "toy"])
def test_a_symlink_in_a_registry_fails_verify_and_pull_as_it_fails_serving(reg, tmp_path, capsys, link):
    """A version's file, its folder or its name folder replaced by a link to a copy outside the registry (the same bytes,
    so every hash matched): verify said ok and pull copied it, while the server refused the folder for its symlink."""
    inside, outside = reg / link, tmp_path / "outside"
    (shutil.copytree if inside.is_dir() else shutil.copy)(inside, outside)
    (shutil.rmtree if inside.is_dir() else os.unlink)(inside)
    inside.symlink_to(outside)
    assert main(["verify", "--registry", str(reg)]) == 1
    assert f"FAIL toy@1.0.0: {link} is a symlink to {str(outside)!r}" in capsys.readouterr().out
    assert main(["pull", "toy", "--registry", str(reg), "--to", str(tmp_path / "out")]) == 2
    _one_line_error(capsys, f"{link} is a symlink")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field, edit", [
    ("metrics.accuracy", lambda e: e["metrics"].update(accuracy=0.99)),
    ("base.fingerprint.quantization", lambda e: e["base"]["fingerprint"].update(quantization="8bit")),
    ("rank", lambda e: e.update(rank=64)),
])
def test_an_index_entry_that_disagrees_with_its_files_fails_verify_and_loading(reg, tmp_path, capsys, field, edit):
    """`list`, `info`, export and the Router's choice of backbone read the index entry; an entry edited by hand (better
    metrics, another quantization) passed verify, pull and serving, as every file still matched its sha256."""
    index = json.loads((reg / "index.json").read_text())
    edit(index["adapters"]["toy"]["1.0.0"])
    (reg / "index.json").write_text(json.dumps(index))
    assert main(["verify", "--registry", str(reg)]) == 1
    assert f"FAIL toy@1.0.0: index.json says {field} " in capsys.readouterr().out
    assert main(["pull", "toy", "--registry", str(reg), "--to", str(tmp_path / "out")]) == 2
    _one_line_error(capsys, f"index.json says {field} ", "but the version's files say")
    assert not (tmp_path / "out").exists()
    with pytest.raises(RegistryError, match=f"index.json says {field} "):
        check_if_registered(reg / "toy" / "1.0.0")  # load_adapter / serve by the folder's path


def test_load_adapter_re_hashes_a_registry_version_after_peft_has_read_it(reg, monkeypatch):
    """load_adapter hashed a registry version's files, then peft read them again by path: weights rewritten in between
    were loaded as the checked version. They are hashed again once read."""
    import adapterhub_lite.artifacts.loading as loading

    version = reg / "toy" / "1.0.0"
    weights = version / "adapter_model.safetensors"
    peft_model = loading.PeftModel

    class RewrittenMeanwhile:  # loading's PeftModel: the files change after the check, before peft reads them
        @staticmethod
        def from_pretrained(model, folder, *args, **kwargs):
            data = bytearray(weights.read_bytes())
            data[-1] ^= 0x01  # the last byte of the last tensor: still a valid safetensors file
            weights.write_bytes(bytes(data))
            return peft_model.from_pretrained(model, folder, *args, **kwargs)
    monkeypatch.setattr(loading, "PeftModel", RewrittenMeanwhile)
    with pytest.raises(RegistryError, match="toy@1.0.0: adapter_model.safetensors does not match its recorded sha256"):
        load_adapter(version)


def test_a_name_that_differs_from_a_published_one_only_by_case_is_refused(reg, adapter, capsys):
    """Toy beside toy: one folder on a case-insensitive file system (macOS, Windows), where publishing Toy@1.0.0 would
    have cleared toy/1.0.0 as a leftover folder and renamed its own files there."""
    before = (reg / "index.json").read_text()
    assert main(["publish", str(adapter), "--name", "Toy", "--version", "1.0.0", "--registry", str(reg)]) == 2
    _one_line_error(capsys, "adapter name 'Toy' differs from the published 'toy' only by case", "--name toy")
    assert (reg / "index.json").read_text() == before and not (reg / "Toy").exists() and LocalRegistry(reg).verify() == []


def test_a_damaged_first_entry_does_not_choose_the_backbone_the_others_are_served_on(adapter, tmp_path):
    """Router.from_registry loaded the backbone the first adapter's index entry names, before any check: an entry edited
    to say 8bit put every other adapter on an 8-bit backbone (a warning each) though the edited one was refused."""
    from adapterhub_lite.serving.router import Router

    reg = LocalRegistry(tmp_path / "reg")
    reg.publish(adapter, "1.0.0", name="first")
    reg.publish(adapter, "1.0.0", name="second")
    index = json.loads((reg.root / "index.json").read_text())
    entry = index["adapters"]["first"]["1.0.0"]
    entry["quantization"] = entry["base"]["fingerprint"]["quantization"] = "8bit"
    (reg.root / "index.json").write_text(json.dumps(index))
    with pytest.warns(UserWarning, match="adapter 'first' is unavailable"):
        router = Router.from_registry(reg.root)
    assert router.backbone.fingerprint["quantization"] == "none" and router.known() == ["second"]
    assert "index.json says base.fingerprint.quantization '8bit'" in router.unavailable["first"]


def test_an_unknown_version_or_name_among_hundreds_is_one_short_line(reg):
    """The refusal listed every version (and every name): 300 versions made a line of thousands of characters. It
    shows the 20 newest versions (the first 20 names) and the count."""
    index = json.loads((reg / "index.json").read_text())
    entry = index["adapters"]["toy"]["1.0.0"]
    index["adapters"]["toy"] = {f"1.0.{i}": entry for i in range(300)}
    index["adapters"].update({f"name{i:03}": {"1.0.0": entry} for i in range(300)})
    (reg / "index.json").write_text(json.dumps(index))
    with pytest.raises(RegistryError) as err:
        LocalRegistry(reg).resolve("toy@9.9.9")
    assert str(err.value).endswith("(versions: … 1.0.280, 1.0.281, 1.0.282, 1.0.283, 1.0.284, 1.0.285, 1.0.286, 1.0.287, 1.0.288, 1.0.289, "
                                   "1.0.290, 1.0.291, 1.0.292, 1.0.293, 1.0.294, 1.0.295, 1.0.296, 1.0.297, 1.0.298, 1.0.299 (300 in all))")
    with pytest.raises(RegistryError) as err:
        LocalRegistry(reg).resolve("nope")
    assert "name018, name019, … (301 in all))" in str(err.value) and len(str(err.value)) < 400


def test_a_folder_changed_while_it_is_copied_is_checked_as_copied(adapter, tmp_path, capsys, monkeypatch):
    """publish checked the folder, then copied it: a sidecar replaced in between (a run still writing, a hand edit) was
    published unchecked, as a version whose sidecar contradicts its weights' config. The copy is checked again."""
    source = tmp_path / "toy"
    shutil.copytree(adapter, source)
    copy = publishing.copy_hashing

    def edited_meanwhile(src, dst):
        if src.name == "adapterhub.json":  # after the checks, before this file is copied
            meta = json.loads(src.read_text())
            meta["method"] = "ia3"
            src.write_text(json.dumps(meta))
        return copy(src, dst)
    monkeypatch.setattr(publishing, "copy_hashing", edited_meanwhile)
    reg = tmp_path / "reg"
    assert main(["publish", str(source), "--version", "1.0.0", "--registry", str(reg)]) == 2
    err = _one_line_error(capsys, f"{str(source)!r} changed while it was copied, and the copy fails the publish checks", "method 'ia3'")
    assert ".publish-" not in err
    assert not (reg / "toy").exists() and not list(reg.glob(".publish-*")) and LocalRegistry(reg).rows() == []


def test_a_temp_index_left_by_a_writer_killed_mid_write_is_cleared_by_the_next_publish(reg, adapter):
    """atomic_write's `.index.json.<random>` of a publisher SIGKILLed while writing the index stayed in the registry
    for good (the sweep cleared only .publish-* folders); the index itself was never torn."""
    leftover = reg / ".index.json.k1ll3d"
    leftover.write_text('{"format": "adapterhub_lite.regi')
    LocalRegistry(reg).publish(adapter)
    assert not leftover.exists() and [r["version"] for r in LocalRegistry(reg).rows()] == ["1.0.0", "1.0.1"]
