"""Registry: publish/pull/load round trip, integrity, immutability, names, crash and concurrency safety."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from adapterhub_lite.artifacts.loading import check_fits, load_adapter
from adapterhub_lite.artifacts.registry import LocalRegistry, RegistryError, parse_ref
from adapterhub_lite.cli import main
from adapterhub_lite.core.errors import AdapterLoadError

from .conftest import train_tiny


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """One tiny trained LoRA adapter folder, shared by the tests of this module."""
    return train_tiny(tmp_path_factory.mktemp("adapter"))


def _logits(model, tok):
    ids = tok(["T: pos 1\nL:"], return_tensors="pt").to(model.device)
    with torch.no_grad():
        return model(**ids).logits


def test_publish_pull_load_gives_identical_outputs(adapter, tmp_path):
    reg = LocalRegistry(tmp_path / "reg")
    assert reg.publish(adapter, "1.0.0")[:2] == ("toy", "1.0.0")
    assert reg.publish(adapter)[1] == "1.0.1"  # auto bumps the patch
    pulled = reg.pull("toy@1.0.0", tmp_path / "pulled")
    direct, backbone, _, _ = load_adapter(adapter)
    via_pull, _, _, _ = load_adapter(pulled)
    via_registry, _, _, _ = load_adapter(reg.path("toy@latest"))
    want = _logits(direct, backbone.tokenizer)
    assert torch.equal(want, _logits(via_pull, backbone.tokenizer)) and torch.equal(want, _logits(via_registry, backbone.tokenizer))
    entry = reg.index()["adapters"]["toy"]["1.0.0"]
    assert entry["method"] == "lora" and entry["rank"] == 8 and entry["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]  # the default: all linear
    assert entry["base"]["fingerprint"]["quantization"] == "none" and "accuracy" in entry["metrics"]
    assert set(entry["files"]) == {p.name for p in adapter.iterdir()}
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in entry["files"].values())


def test_a_pulled_folder_loads_with_plain_peft_and_gives_the_source_s_logits(adapter, tmp_path):
    """No adapterhub_lite on the way in: transformers loads the backbone the sidecar names, peft the pulled folder."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reg = LocalRegistry(tmp_path / "reg")
    reg.publish(adapter, "1.0.0")
    pulled = reg.pull("toy@latest", tmp_path / "pulled")
    base = json.loads((adapter / "adapterhub.json").read_text())["base"]["hub_id"]
    tok = AutoTokenizer.from_pretrained(base)
    out = [_logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(f)).eval(), tok) for f in (adapter, pulled)]
    assert torch.equal(out[0], out[1])
    assert not torch.equal(out[0], _logits(AutoModelForCausalLM.from_pretrained(base).eval(), tok))  # the adapter is applied


def test_published_versions_are_immutable(adapter, tmp_path):
    reg = LocalRegistry(tmp_path / "reg")
    reg.publish(adapter, "2.0.0")
    with pytest.raises(RegistryError, match="already published and versions are immutable"):
        reg.publish(adapter, "2.0.0")


def test_a_flipped_byte_fails_verify_and_loading(adapter, tmp_path, capsys):
    reg = LocalRegistry(tmp_path / "reg")
    reg.publish(adapter, "1.0.0")
    assert reg.verify() == []
    assert main(["verify", "--registry", str(tmp_path / "reg")]) == 0
    assert capsys.readouterr().out == "verify: ok, 1 version(s) of 1 adapter(s) checked\n"
    (tmp_path / "empty").mkdir()  # a wrong --registry: nothing there is not a pass
    assert main(["verify", "--registry", str(tmp_path / "empty")]) == 0
    assert "holds no versions" in capsys.readouterr().out
    weights = tmp_path / "reg" / "toy" / "1.0.0" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    assert reg.verify("toy") == ["toy@1.0.0: adapter_model.safetensors does not match its recorded sha256"]
    with pytest.raises(RegistryError, match="integrity check failed for toy@1.0.0"):
        load_adapter(reg.path("toy@1.0.0"))
    assert main(["verify", "toy", "--registry", str(tmp_path / "reg")]) == 1
    assert "FAIL toy@1.0.0" in capsys.readouterr().out


def test_a_damaged_version_is_not_pulled_and_an_unknown_name_is_a_verify_problem(adapter, tmp_path):
    """pull hands out what path() would: a version whose bytes changed after publishing is refused (nothing copied),
    not copied out as if good; and Registry.verify of a name the index lacks reports it (the CLI refuses it before
    calling verify, but the method's empty list would read as a pass)."""
    reg = LocalRegistry(tmp_path / "reg")
    reg.publish(adapter, "1.0.0")
    weights = tmp_path / "reg" / "toy" / "1.0.0" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match="integrity check failed for toy@1.0.0"):
        reg.pull("toy@1.0.0", tmp_path / "out" / "toy")
    assert not (tmp_path / "out").exists()
    assert reg.verify("nosuch") == [f"no adapter 'nosuch' in registry {tmp_path / 'reg'}"]


def test_hidden_files_beside_an_adapter_are_not_published(adapter, tmp_path):
    """A folder's hidden files (.DS_Store, an editor's swap file) are not part of the adapter: publish leaves them out
    of the version, as reindex and the Hub upload do, so an index rebuilt from the folder equals the published one."""
    import shutil

    folder = tmp_path / "toy"
    shutil.copytree(adapter, folder)
    (folder / ".DS_Store").write_bytes(b"finder")
    reg = LocalRegistry(tmp_path / "reg")
    _, _, entry = reg.publish(folder, "1.0.0")
    assert ".DS_Store" not in entry["files"] and not (tmp_path / "reg" / "toy" / "1.0.0" / ".DS_Store").exists()
    (tmp_path / "reg" / "index.json").unlink()
    assert reg.reindex()["adapters"]["toy"]["1.0.0"]["files"] == entry["files"] and reg.verify() == []


def test_a_file_planted_in_a_version_folder_fails_verify_and_loading(adapter, tmp_path):
    """A version is exactly its recorded files: a file added after publishing (a second weights file peft would
    prefer, a pickle) makes it fail its check like a changed byte."""
    reg = LocalRegistry(tmp_path / "reg")
    reg.publish(adapter, "1.0.0")
    (tmp_path / "reg" / "toy" / "1.0.0" / "adapter_model.bin").write_bytes(b"planted")
    assert reg.verify("toy") == ["toy@1.0.0: unexpected file adapter_model.bin"]
    with pytest.raises(RegistryError, match="integrity check failed for toy@1.0.0: toy@1.0.0: unexpected file adapter_model.bin"):
        reg.path("toy@1.0.0")


def test_pickle_adapters_are_refused_and_convert_is_opt_in(adapter, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(adapter, folder)
    state = load_file(folder / "adapter_model.safetensors")
    torch.save(state, folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    reg = LocalRegistry(tmp_path / "reg")
    with pytest.raises(RegistryError, match=r"pickle weights \['adapter_model.bin'\]"):
        reg.publish(folder, "1.0.0")
    assert main(["convert", str(folder)]) == 2 and "--trust-pickle" in capsys.readouterr().err
    assert main(["convert", str(folder), "--trust-pickle"]) == 0
    assert reg.publish(folder, "1.0.0")[1] == "1.0.0"
    assert torch.equal(load_file(reg.path("toy@1.0.0") / "adapter_model.safetensors")["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"],
                       state["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"])


@pytest.mark.parametrize("bad", ["../evil", "a/b", "/abs", "..", "", "x@1.0", "toy@1.0.0.0", "toy@v1", "toy\n", "toy@1.0.0\n", "toy@01.0.0",
                                 "a\\b", "to\x00y", "\uff54\uff4f\uff59", "t\u043ey", "toy@1.0.0-rc1", "toy@1.0.0+build", "toy@LATEST"])
def test_bad_names_and_versions_are_refused(bad):
    with pytest.raises(RegistryError, match="invalid (adapter name|version)"):
        parse_ref(bad)


@pytest.mark.parametrize("ref", ["toy@auto", "toy@1.0.0-rc1"])
def test_a_bad_version_in_a_reference_offers_latest_not_publish_s_auto(ref):
    """`pull toy@auto` was told "use MAJOR.MINOR.PATCH …, or 'auto'": the fix it named is the value it refused."""
    with pytest.raises(RegistryError) as err:
        parse_ref(ref)
    assert "'auto'" not in str(err.value).replace(repr(ref.split("@")[1]), "") and "toy@latest" in str(err.value)
    assert "pre-release" in str(err.value)


def test_publish_refuses_a_bad_name_and_writes_nothing(adapter, tmp_path, capsys):
    code = main(["publish", str(adapter), "--name", "../escape", "--registry", str(tmp_path / "reg")])
    assert code == 2 and "invalid adapter name '../escape'" in capsys.readouterr().err
    assert not (tmp_path / "escape").exists() and not (tmp_path / "reg" / "index.json").exists()


@pytest.mark.parametrize("name, why", [("nul", "Windows device name"), ("CON.v2", "Windows device name"), ("toy.", "ends in '.'")])
def test_publish_refuses_a_name_that_is_no_folder_on_windows(adapter, tmp_path, capsys, name, why):
    """A registry is a folder others read on other systems (shared, synced, or a Hub registry pulled there): a version
    published as `nul` would be written into the null device on Windows, `toy.` into toy's folder."""
    code = main(["publish", str(adapter), "--name", name, "--registry", str(tmp_path / "reg")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"error: invalid adapter name {name!r}: it") and why in err and "\n" not in err
    assert not (tmp_path / "reg" / "index.json").exists()


@pytest.mark.parametrize("recorded", ["mix ü", "nul", "toy."])
def test_a_name_from_the_sidecar_that_cannot_be_published_names_its_source_and_name(adapter, tmp_path, capsys, recorded):
    """Without --name a publish takes the name adapterhub.json records, which a merge takes from its --output folder
    (`merge … --output "runs/mix ü"`): it was refused as "invalid adapter name 'mix ü': use letters, digits …", a name
    the user never gave, with no word of where it came from or of --name."""
    import shutil

    folder = tmp_path / "merged"
    shutil.copytree(adapter, folder)
    meta = json.loads((folder / "adapterhub.json").read_text())
    meta["name"] = recorded
    (folder / "adapterhub.json").write_text(json.dumps(meta))
    code = main(["publish", str(folder), "--registry", str(tmp_path / "reg")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and f"invalid adapter name {recorded!r}" in err and "\n" not in err, err
    assert str(folder / "adapterhub.json") in err and "--name" in err, err
    assert not (tmp_path / "reg" / "index.json").exists()


def test_four_concurrent_publishers_lose_no_entry(adapter, tmp_path):
    reg = tmp_path / "reg"
    code = "import sys; from adapterhub_lite.artifacts.registry import LocalRegistry; LocalRegistry(sys.argv[1]).publish(sys.argv[2])"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(reg), str(adapter)]) for _ in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    assert sorted(LocalRegistry(reg).index()["adapters"]["toy"]) == ["1.0.0", "1.0.1", "1.0.2", "1.0.3"]
    assert LocalRegistry(reg).verify() == []


def test_a_publish_waits_for_the_registry_lock_and_gives_up_naming_it(adapter, tmp_path, monkeypatch):
    """Publishes are serialised by the registry's lock (the concurrent test above seldom overlaps inside it): while
    another process holds it, a publish waits, then refuses with one line and writes nothing; once free, it publishes."""
    import adapterhub_lite.artifacts.publishing as publishing

    reg = tmp_path / "reg"
    LocalRegistry(reg).publish(adapter, "1.0.0")
    before = (reg / "index.json").read_text()
    hold = "import sys, time; from filelock import FileLock; lock = FileLock(sys.argv[1]); lock.acquire(); print('held', flush=True); time.sleep(120)"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(reg / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(publishing, "LOCK_TIMEOUT_S", 0.5)
        start = time.monotonic()
        with pytest.raises(RegistryError, match=r"stayed locked by another publisher for 0.5 s"):
            LocalRegistry(reg).publish(adapter, "1.0.1")
        assert time.monotonic() - start >= 0.5  # it waited
        assert (reg / "index.json").read_text() == before and not (reg / "toy" / "1.0.1").exists()
    finally:
        holder.kill()
        holder.wait()
    assert LocalRegistry(reg).publish(adapter, "1.0.1")[1] == "1.0.1"


# A publisher that stops (sleeps) at a chosen point after touching a marker file, to be SIGKILLed there.
STALLED = """
import sys, time, pathlib
import adapterhub_lite.artifacts.publishing as p
import adapterhub_lite.artifacts.registry as r
root, folder, marker, where = sys.argv[1:]
def stall():
    pathlib.Path(marker).touch()
    time.sleep(600)
if where == "mid-copy":  # after the first files are copied, before the rest
    copy = p.copy_hashing
    def slow(src, dst):
        out = copy(src, dst)
        if src.name == "adapterhub.json":
            stall()
        return out
    p.copy_hashing = slow
else:  # after the rename into place, before the index is written
    p.write_json = lambda *a: stall()
r.LocalRegistry(root).publish(folder, "1.0.1")
"""


def kill_at_stall(script: list[str], marker: Path) -> None:
    """Run `python -c script[0] script[1:]…`, wait until it writes `marker` (it stalls there, mid-write), SIGKILL it."""
    proc = subprocess.Popen([sys.executable, "-c", *script])
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert marker.exists(), f"the writer never reached the stall point (exit {proc.poll()})"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("where", ["mid-copy", "before-index"])
def test_publisher_killed_with_sigkill_leaves_a_valid_index(adapter, tmp_path, where):
    reg_dir, marker = tmp_path / "reg", tmp_path / "stalled"
    LocalRegistry(reg_dir).publish(adapter, "1.0.0")
    before = (reg_dir / "index.json").read_text()
    kill_at_stall([STALLED, str(reg_dir), str(adapter), str(marker), where], marker)
    assert (reg_dir / "index.json").read_text() == before  # old index, whole and valid
    assert [r["version"] for r in LocalRegistry(reg_dir).rows()] == ["1.0.0"] and LocalRegistry(reg_dir).verify() == []
    with pytest.raises(RegistryError, match="no version '1.0.1'"):
        LocalRegistry(reg_dir).resolve("toy@1.0.1")
    assert LocalRegistry(reg_dir).publish(adapter, "1.0.1")[1] == "1.0.1"  # leftovers do not block a retry
    assert not list(reg_dir.glob(".publish-*")) and LocalRegistry(reg_dir).verify() == []


def test_wrong_backbone_is_refused_with_both_fingerprints(adapter, tmp_path):
    import shutil

    folder = tmp_path / "other_base"
    shutil.copytree(adapter, folder)
    meta = json.loads((folder / "adapterhub.json").read_text())
    meta["base"]["fingerprint"].update(weights_sha256="1" * 64, id="0123456789abcdef")
    (folder / "adapterhub.json").write_text(json.dumps(meta))
    reg = LocalRegistry(tmp_path / "reg")
    reg.publish(folder, "1.0.0")
    with pytest.raises(AdapterLoadError) as err:
        load_adapter(reg.path("toy@1.0.0"))
    here = json.loads((adapter / "adapterhub.json").read_text())["base"]["fingerprint"]["id"]
    assert "0123456789abcdef" in str(err.value) and here in str(err.value) and "--allow-base-mismatch" in str(err.value)


def test_shapes_that_do_not_fit_are_refused_before_loading(adapter):
    other = LlamaForCausalLM(LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(AdapterLoadError, match="lora_A expects 64 inputs, the layer has 32"):
        check_fits(adapter, other)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_list_info_pull_from_the_command_line(adapter, tmp_path, capsys):
    reg = str(tmp_path / "reg")
    assert main(["publish", str(adapter), "--registry", reg, "--version", "1.2.3"]) == 0
    capsys.readouterr()
    assert main(["list", "--registry", reg]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:5] == ["name", "version", "task", "method", "rank"] and out[1].split()[:5] == ["toy", "1.2.3", "toy", "lora", "8"]
    assert main(["info", "toy@1.2.3", "--registry", reg]) == 0 and json.loads(capsys.readouterr().out)["version"] == "1.2.3"
    assert main(["pull", "toy", "--registry", reg, "--to", str(tmp_path / "p")]) == 0 and (tmp_path / "p" / "adapter_config.json").exists()
    assert main(["pull", "toy", "--registry", reg, "--to", str(tmp_path / "p")]) == 2
    assert main(["info", "nope", "--registry", reg]) == 2 and "no adapter 'nope'" in capsys.readouterr().err


def test_hub_registry_unreachable_is_one_line(adapter, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["publish", str(adapter), "--registry", "hf://org/toy-adapters"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot reach the Hugging Face Hub for hf://org/toy-adapters") and "\n" not in err


def _fake_hub(monkeypatch, content, cache):
    """huggingface_hub's downloads, offline, over `content` (a local registry as the repository holds it): a snapshot
    in its cache is symlinks into the cache's blobs (as on Linux), a `local_dir` download is regular files."""
    import fnmatch
    import hashlib
    import os
    import shutil

    import huggingface_hub

    files = [p for p in sorted(content.rglob("*")) if p.is_file() and not any(part.startswith(".") for part in p.relative_to(content).parts)]

    def snapshot_download(repo, allow_patterns=(), local_dir=None, **kwargs):
        wanted = [p for p in files if any(fnmatch.fnmatch(p.relative_to(content).as_posix(), pat) for pat in allow_patterns)]
        out = Path(local_dir) if local_dir else cache / "snapshots" / "abc"
        for p in wanted:
            dest = out / p.relative_to(content)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if local_dir:
                shutil.copyfile(p, dest)
            elif not dest.is_symlink():
                blob = cache / "blobs" / hashlib.sha256(p.read_bytes()).hexdigest()
                blob.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, blob)
                dest.symlink_to(os.path.relpath(blob, dest.parent))
        return str(out)

    class Api:
        def repo_info(self, repo):
            return type("Info", (), {"sha": "abc"})()
    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name, **kw: str(content / name))


def test_a_hub_registry_version_is_served_and_loaded_from_regular_files(adapter, tmp_path, monkeypatch):
    """A Hub registry's versions were handed out as the Hub cache's snapshot folder, whose files are symlinks into
    its blobs: every way in refuses symlinks, so `serve --registry hf://…` served nothing ("holds symlinks") and
    load_adapter(reg.path(ref)) refused the snapshot's index.json as a symlink."""
    from adapterhub_lite.artifacts.hub import HubRegistry
    from adapterhub_lite.serving.router import Router

    content = tmp_path / "repo"
    LocalRegistry(content).publish(adapter, "1.0.0")
    _fake_hub(monkeypatch, content, tmp_path / "hf-cache")
    reg = HubRegistry("org/adapters")
    folder = reg.path("toy@latest")
    assert not any(p.is_symlink() for p in folder.iterdir()) and reg.verify() == []
    model, backbone, _, _ = load_adapter(folder)
    want, _, _, _ = load_adapter(adapter)
    assert torch.equal(_logits(model, backbone.tokenizer), _logits(want, backbone.tokenizer))
    router = Router.from_registry("hf://org/adapters")
    assert router.known() == ["toy"] and router.unavailable == {}


def test_a_hub_publish_uploads_the_bytes_it_checked_and_hashed(adapter, tmp_path, monkeypatch):
    """A Hub publish checked and hashed the folder's files, then the upload read them again by path: a sidecar
    replaced in between (here while the index is read) was uploaded unchecked, under the sha256 of the old one."""
    import hashlib
    import shutil

    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    from adapterhub_lite.artifacts.hub import HubRegistry

    source = tmp_path / "toy"
    shutil.copytree(adapter, source)
    sent = {}

    class Api:
        def repo_info(self, repo):  # after the checks: the sidecar is replaced now
            meta = json.loads((source / "adapterhub.json").read_text())
            meta["method"] = "ia3"
            (source / "adapterhub.json").write_text(json.dumps(meta))
            return type("Info", (), {"sha": "abc"})()

        def list_repo_files(self, repo, revision=None):
            return []

        def create_commit(self, repo, ops, **kwargs):  # what the Hub receives
            for op in ops:
                what = op.path_or_fileobj
                sent[op.path_in_repo] = what if isinstance(what, bytes) else Path(what).read_bytes()

    def no_index(*args, **kwargs):
        raise EntryNotFoundError("index.json")
    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_index)
    _, _, entry = HubRegistry("org/adapters").publish(source, "1.0.0")
    assert json.loads(sent["toy/1.0.0/adapterhub.json"])["method"] == "lora"
    for fname, rec in entry["files"].items():
        assert hashlib.sha256(sent[f"toy/1.0.0/{fname}"]).hexdigest() == rec["sha256"], fname
    assert json.loads(sent["index.json"])["adapters"]["toy"]["1.0.0"] == entry


def test_prompt_learning_width_mismatch_is_refused(tmp_path):
    from peft import PromptTuningConfig, get_peft_model

    from adapterhub_lite.model.backbone import load_backbone

    small = LlamaForCausalLM(LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    get_peft_model(small, PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")).save_pretrained(tmp_path / "p")
    with pytest.raises(AdapterLoadError, match="token_dim 32 != 64"):
        check_fits(tmp_path / "p", load_backbone("tiny-random-llama", "none").model)


def test_adapter_ref_takes_a_folder_or_a_registry_name(adapter, tmp_path):
    from adapterhub_lite.artifacts.registries import adapter_ref

    assert adapter_ref(adapter) == (adapter.name, adapter)
    LocalRegistry(tmp_path / "reg").publish(adapter, name="toy")
    name, folder = adapter_ref("toy@1.0.0", tmp_path / "reg")
    assert name == "toy" and (folder / "adapter_model.safetensors").is_file()
    with pytest.raises(RegistryError, match="adapter folder '/nope/toy' does not exist"):
        adapter_ref("/nope/toy", tmp_path / "reg")


def _on_other_backbone(adapter, folder: Path, **fingerprint) -> Path:
    """A copy of `adapter` whose sidecar says it was trained on another backbone (or, given, other fingerprint keys)."""
    import shutil

    shutil.copytree(adapter, folder)
    meta = json.loads((folder / "adapterhub.json").read_text())
    meta["base"]["fingerprint"].update(fingerprint or {"weights_sha256": "1" * 64, "id": "0123456789abcdef"})
    (folder / "adapterhub.json").write_text(json.dumps(meta))
    return folder


def test_a_version_on_another_backbone_than_the_name_s_latest_is_refused_unless_allowed(adapter, tmp_path, capsys):
    """A new version of a name on another backbone moved every client of name@latest to that backbone (a server of
    the old one then listed the name unavailable), and publish said nothing."""
    reg = LocalRegistry(tmp_path / "reg")
    reg.publish(adapter, "1.0.0")
    other = _on_other_backbone(adapter, tmp_path / "other")
    before = (tmp_path / "reg" / "index.json").read_bytes()
    with pytest.raises(RegistryError) as err:
        reg.publish(other)
    here = json.loads((adapter / "adapterhub.json").read_text())["base"]["fingerprint"]["id"]
    assert "toy@1.0.0" in str(err.value) and here in str(err.value) and "0123456789abcdef" in str(err.value)
    assert "--allow-base-change" in str(err.value) and "--name" in str(err.value)
    assert (tmp_path / "reg" / "index.json").read_bytes() == before and not (tmp_path / "reg" / "toy" / "1.0.1").exists()
    # the command line: one line, exit 2; then said on purpose, the name moves, and the old backbone is now the change
    assert main(["publish", str(other), "--registry", str(tmp_path / "reg")]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: toy@1.0.0 (its latest version) was trained on backbone") and "\n" not in line
    assert main(["publish", str(other), "--registry", str(tmp_path / "reg"), "--allow-base-change"]) == 0
    assert reg.resolve("toy")[1] == "1.0.1"
    with pytest.raises(RegistryError, match="toy@1.0.1 .* was trained on backbone 0123456789abcdef"):
        reg.publish(adapter)
    # another quantization of the same weights is the same backbone (QLoRA practice); another name is another name
    assert reg.publish(_on_other_backbone(other, tmp_path / "q", quantization="8bit"))[1] == "1.0.2"
    assert reg.publish(adapter, name="toy2")[:2] == ("toy2", "1.0.0")


def test_a_hub_publish_on_another_backbone_than_the_name_s_latest_is_refused_before_any_upload(adapter, tmp_path, monkeypatch):
    from adapterhub_lite.artifacts.hub import HubRegistry

    content = tmp_path / "repo"
    LocalRegistry(content).publish(adapter, "1.0.0")
    _fake_hub(monkeypatch, content, tmp_path / "hf-cache")
    import huggingface_hub

    class Api:
        def repo_info(self, repo):
            return type("Info", (), {"sha": "abc"})()

        def list_repo_files(self, repo, revision=None):
            return ["index.json", "toy/1.0.0/adapterhub.json"]

        def create_commit(self, repo, ops, **kwargs):
            raise AssertionError(f"uploaded {[op.path_in_repo for op in ops]}")
    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    with pytest.raises(RegistryError, match="toy@1.0.0 .* --allow-base-change"):
        HubRegistry("org/adapters").publish(_on_other_backbone(adapter, tmp_path / "other"))
