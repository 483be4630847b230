"""One check for every way an adapter folder comes in (publish, loading at run time, predict/eval by path, a
server's start): the same folder rules and the same sidecar validation, one line naming the field; and the
files are hashed again at every load, not only when the server starts."""

import json
import shutil

import httpx
import pytest

from adapterhub_lite.artifacts.folder import check_adapter_folder
from adapterhub_lite.artifacts.registry import LocalRegistry
from adapterhub_lite.cli import main
from adapterhub_lite.core.errors import AdapterLoadError
from adapterhub_lite.serving.router import Router

from .conftest import train_tiny
from .serving import Served


@pytest.fixture
def copy(adapters, tmp_path):
    """A fresh copy of cls_a to damage."""
    folder = tmp_path / "copy"
    shutil.copytree(adapters["cls_a"], folder)
    return folder


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def edit_sidecar(folder, change):
    meta = json.loads((folder / "adapterhub.json").read_text())
    change(meta)
    (folder / "adapterhub.json").write_text(json.dumps(meta))


def v1(**base):
    """A format-1 sidecar (the upgrade path) whose base is `base` (absent when None)."""
    def change(meta):
        meta["format"] = "adapterhub_lite.adapter/1"
        if "drop" in base:
            del meta["base"]
        else:
            meta["base"] = base["value"]
    return change


SIDECARS = {
    "no prompt": (lambda m: m["task"].pop("prompt"), "prompt"),
    "fingerprint without weights_sha256": (lambda m: m["base"]["fingerprint"].pop("weights_sha256"), "weights_sha256"),
    "fingerprint missing": (lambda m: m["base"].pop("fingerprint"), "base.fingerprint"),
    "fingerprint a string": (lambda m: m["base"].update(fingerprint="abc"), "base.fingerprint"),
    "task null on a classifier": (lambda m: m.update(task=None), "label_words"),
    "method prefix on a LoRA": (lambda m: m.update(method="prefix"), "method 'prefix'"),
    "method unknown": (lambda m: m.update(method="dora"), "method"),
    "format a list": (lambda m: m.update(format=["adapterhub_lite.adapter/2"]), "format"),
    "format-1, base null": (v1(value=None), "base is None"),
    "format-1, base a string": (v1(value="smollm2"), "base is 'smollm2'"),
    "format-1, base missing": (v1(drop=True), "base is None"),
    "name empty": (lambda m: m.update(name=""), "name"),
}


@pytest.mark.parametrize("case", list(SIDECARS))
def test_a_malformed_sidecar_is_one_line_from_every_way_in(copy, tmp_path, capsys, case):
    change, needle = SIDECARS[case]
    edit_sidecar(copy, change)
    for argv in (["publish", str(copy), "--registry", str(tmp_path / "reg")], ["predict", str(copy), "--text", "pos 1"],
                 ["eval", str(copy), "--limit", "2"]):
        assert main(argv) == 2, (case, argv)
        assert needle in one_line_error(capsys), (case, argv)
    assert not (tmp_path / "reg").exists() or not list((tmp_path / "reg").glob("*/*"))  # nothing was published


@pytest.mark.parametrize("case", list(SIDECARS))
def test_a_malformed_sidecar_is_refused_when_loaded_at_run_time(serve_registry, copy, case):
    change, needle = SIDECARS[case]
    edit_sidecar(copy, change)
    s = Served(serve_registry)
    try:
        r = s.post("/v1/load_lora_adapter", {"lora_name": "late", "lora_path": str(copy)})
        assert r.status_code == 400 and needle in r.json()["error"]["message"], (case, r.text)
        assert s.post("/v1/completions", {"model": "gen_a", "input": "ab"}).status_code == 200  # the server goes on
    finally:
        s.close()


FOLDERS = {
    "only a pickle": (lambda f: ((f / "adapter_model.safetensors").unlink(), (f / "adapter_model.bin").write_bytes(b"x")), "adapter_model.bin"),
    "a pickle beside the safetensors": (lambda f: (f / "extra.pt").write_bytes(b"x"), "extra.pt"),
    "a symlink to a system file": (lambda f: (f / "notes.txt").symlink_to("/etc/hostname"), "symlinks ['notes.txt']"),
    # adapter_config.json's r halved, the weights as trained: peft refuses it (size mismatch for ...lora_A); a per-row
    # server loaded it at the weights' rank and answered, a run-time load was answered 200
    "a config rank that is not the weights'": (lambda f: _edit_config(f, r=2), "adapter_config.json gives rank 2"),
    # and doubled: a config wider than its weights is refused alike (peft's size mismatch either way), not only a narrower one
    "a config rank above the weights'": (lambda f: _edit_config(f, r=16), "adapter_config.json gives rank 16"),
}


def _edit_config(folder, **fields):
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **fields}))


@pytest.mark.parametrize("case", list(FOLDERS))
def test_folder_rules_are_the_same_for_publish_runtime_loading_and_predict(serve_registry, copy, tmp_path, capsys, case):
    make, needle = FOLDERS[case]
    make(copy)
    assert main(["publish", str(copy), "--registry", str(tmp_path / "reg")]) == 2
    assert needle in one_line_error(capsys)
    assert main(["predict", str(copy), "--text", "pos 1"]) == 2
    assert needle in one_line_error(capsys) or "adapter_model.bin" in needle
    with pytest.raises(AdapterLoadError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        Router.from_registry(serve_registry, quantization="none", dtype="fp32").register("late", copy)


def test_a_rank_pattern_adapter_is_checked_at_each_module_s_own_rank(tmp_path):
    """check_lora_ranks reads a module's rank from rank_pattern when it names the module (as peft sizes it), r otherwise:
    a valid adapter with v_proj at 8 beside r=4 passes, and its config with v_proj's entry changed is refused naming it."""
    folder = train_tiny(tmp_path, "patterned", method_args={"r": 4, "lora_alpha": 8, "rank_pattern": {"v_proj": 8}})
    check_adapter_folder(folder)  # r for q_proj, rank_pattern for v_proj: the weights as trained
    _edit_config(folder, rank_pattern={"v_proj": 4})
    with pytest.raises(AdapterLoadError, match=r"gives rank 4 to .*v_proj but .* holds it at rank 8"):
        check_adapter_folder(folder)


def test_runtime_loading_applies_the_publish_rules_and_one_bad_adapter_hurts_no_one(serve_registry, copy):
    """A pickle-only folder used to be loaded ("Success"), then failed every request and cut other streams."""
    FOLDERS["only a pickle"][0](copy)
    s = Served(serve_registry)
    try:
        streaming = s.client.completions.create(model="base", prompt="a b", max_tokens=40, stream=True)
        first = next(iter(streaming))
        r = s.post("/v1/load_lora_adapter", {"lora_name": "late", "lora_path": str(copy)})
        assert r.status_code == 400 and "adapter_model.bin" in r.json()["error"]["message"], r.text
        rest = list(streaming)
        assert rest[-1].choices[0].finish_reason == "length" and len([first, *rest]) >= 40  # the running stream finished
    finally:
        s.close()


def test_publish_refuses_an_empty_name(adapters, tmp_path, capsys):
    assert main(["publish", str(adapters["cls_a"]), "--registry", str(tmp_path / "reg"), "--name", ""]) == 2
    assert "invalid adapter name ''" in one_line_error(capsys)
    assert not (tmp_path / "reg").exists() or not list((tmp_path / "reg").glob("*/*"))


def test_files_are_hashed_at_every_load_not_only_at_start(serve_registry, tmp_path):
    """Weights swapped in the registry after start-up were served (gen_a answered with gen_b's log-probs)."""
    reg = tmp_path / "reg"
    shutil.copytree(serve_registry, reg)
    s = Served(reg)
    try:
        shutil.copy(reg / "gen_b" / "1.0.0" / "adapter_model.safetensors", reg / "gen_a" / "1.0.0" / "adapter_model.safetensors")
        r = s.post("/v1/completions", {"model": "gen_a", "input": "ab"})
        # the server's files are at fault, not the request: a 503 no retry cures, as for a version damaged before start-up
        assert r.status_code == 503 and r.json()["error"]["code"] == "adapter_unavailable" and r.headers["x-should-retry"] == "false", r.text
        assert "changed since it was checked" in r.json()["error"]["message"], r.text
        health = httpx.get(s.url + "/health").json()
        assert "gen_a" in health["changed_adapters"] and "gen_a" in health["unavailable_adapters"]
        card = next(m.model_extra for m in s.client.models.list().data if m.id == "gen_a")
        assert card["available"] is False and "changed since it was checked" in card["unavailable_reason"]
        pinned = s.post("/v1/completions", {"model": "gen_a@1.0.0", "input": "ab"})  # its pinned id is as unavailable
        assert pinned.status_code == 503 and pinned.json()["error"]["code"] == "adapter_unavailable", pinned.text
        again = s.post("/v1/completions", {"model": "gen_a", "input": "ab"})  # refused up front now, with the same why
        assert again.status_code == 503 and "changed since it was checked" in again.json()["error"]["message"], again.text
        assert s.post("/v1/completions", {"model": "gen_b", "input": "ab"}).status_code == 200  # the others are served
        # files restored (the registry's re-hash passes again): a reload registers the version again and it is served
        shutil.copy(serve_registry / "gen_a" / "1.0.0" / "adapter_model.safetensors", reg / "gen_a" / "1.0.0" / "adapter_model.safetensors")
        assert s.post("/v1/reload", {}).status_code == 200
        assert s.post("/v1/completions", {"model": "gen_a", "input": "ab"}).status_code == 200
        assert s.post("/v1/completions", {"model": "gen_a@1.0.0", "input": "ab"}).status_code == 200
        assert not {"gen_a", "gen_a@1.0.0"} & set(httpx.get(s.url + "/health").json()["unavailable_adapters"])
    finally:
        s.close()


def test_a_registry_version_with_a_malformed_sidecar_stops_serve_in_one_line(adapters, tmp_path, capsys):
    """A version published before sidecars were validated (its index records the damaged file's hash): `serve` refuses it by field."""
    from adapterhub_lite.artifacts.index import file_record
    from adapterhub_lite.artifacts.registry import LocalRegistry

    reg = tmp_path / "reg"
    LocalRegistry(reg).publish(adapters["cls_a"], "1.0.0")
    version = reg / "cls_a" / "1.0.0"
    edit_sidecar(version, lambda m: m["base"]["fingerprint"].pop("weights_sha256"))
    index = json.loads((reg / "index.json").read_text())
    index["adapters"]["cls_a"]["1.0.0"]["files"]["adapterhub.json"] = file_record(version / "adapterhub.json")
    (reg / "index.json").write_text(json.dumps(index))
    assert main(["serve", "--registry", str(reg), "--port", "0", "--quantization", "none"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the backbone's loading bar
    assert last.startswith("error: ") and "weights_sha256" in last and "Traceback" not in last, last
    assert "(or restore its sidecar)" in last, last  # the reason whole, its fix included (it was cut at 200 characters)


WEIGHT_DAMAGE = {
    "cut inside its header": lambda b: b[:1000],
    "cut inside its tensors": lambda b: b[:-100],
    "empty": lambda b: b"",
    "not safetensors": lambda b: b"\x00" * 64,
}


@pytest.mark.parametrize("damage", list(WEIGHT_DAMAGE))
def test_damaged_weights_are_one_line_from_every_way_in(adapters, copy, tmp_path, capsys, damage):
    """A truncated adapter_model.safetensors (a copy cut short, a full disk) came out of publish, predict, eval, merge and
    reindex as safetensors' SafetensorError traceback ("invalid header length", exit 1)."""
    weights = copy / "adapter_model.safetensors"
    weights.write_bytes(WEIGHT_DAMAGE[damage](weights.read_bytes()))
    reg = tmp_path / "reg"
    for argv in (["publish", str(copy), "--registry", str(reg)], ["predict", str(copy), "--text", "pos 1"],
                 ["eval", str(copy), "--limit", "2"],
                 ["merge", str(copy), str(adapters["cls_b"]), "--weights", "1", "1", "--task", "cls_a", "--report-rows", "0",
                  "--output", str(tmp_path / "merged")]):
        assert main(argv) == 2, (damage, argv)
        assert "adapter_model.safetensors" in one_line_error(capsys), (damage, argv)
    assert not (tmp_path / "merged").exists()
    assert not reg.exists() or not list(reg.glob("*/*"))  # nothing was published
    # reindex lists the damaged version folder among those that would not publish, and writes nothing
    LocalRegistry(reg).publish(adapters["cls_b"], "1.0.0")
    shutil.copytree(copy, reg / "cls_a" / "1.0.0")
    (reg / "index.json").unlink()
    assert main(["reindex", "--registry", str(reg)]) == 2
    err = one_line_error(capsys)
    assert "cls_a@1.0.0" in err and "adapter_model.safetensors" in err, err
    assert not (reg / "index.json").exists()
