"""What a chaos soak of the server (every request kind, load, unload, merge and disconnect at once) found, each
reduced to a small deterministic case."""

import logging
import shutil
import threading

import pytest
import torch
import transformers

import adapterhub_lite.serving.manager as manager
from adapterhub_lite.model.backbone import load_backbone
from adapterhub_lite.ops.merge import merge_adapters
from adapterhub_lite.serving.router import Router

from .conftest import train_tiny
from .serving import Served

LAYER = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Two tiny LoRA adapters of one task (r=4) and the backbone's config, as the server merges on."""
    d = tmp_path_factory.mktemp("chaos")
    out = {}
    for name, seed in (("a", 1), ("b", 2)):
        (d / name).mkdir()
        out[name] = train_tiny(d / name, "toy", method_args={"r": 4, "init_lora_weights": False}, train={"seed": seed})
    return out, load_backbone("tiny-random-llama", "none", "cpu", "fp32").model.config


def _merge(two, w, tmp):
    folders, config = two
    model, _ = merge_adapters(folders, {"a": w, "b": 1 - w}, "linear", name="mix", report_rows=0, output=tmp, base_config=config)
    layer = model.get_submodule(LAYER)
    return layer.lora_A["mix"].weight.detach().clone(), layer.lora_B["mix"].weight.detach().clone()


def test_two_weightless_merges_built_at_once_both_get_their_factors(two, tmp_path, monkeypatch):
    """The server builds each per-request merge on a worker thread, so two recipes build at once. The weightless
    model they merge on was made under accelerate's init_empty_weights (and peft's low_cpu_mem_usage), which patch
    nn.Module.register_parameter for the whole process: the other build's merged factors were made on the meta device
    (the soak's requests got a plain-text 500, 'Cannot copy out of meta tensor'), and the patch could outlive both.
    Here a second merge runs to its end on another thread while the first is inside its model construction."""
    alone = _merge(two, 0.3, tmp_path / "alone")
    register = torch.nn.Module.register_parameter
    orig, outcome, started = transformers.AutoModelForCausalLM.from_config, {}, []

    def second():
        try:
            outcome["factors"] = _merge(two, 0.3, tmp_path / "second")
        except Exception as exc:  # noqa: BLE001 - the test reports what the racing build raised
            outcome["error"] = exc

    def from_config(config, **kw):  # the first build, inside its weightless construction, lets the second run whole
        model = orig(config, **kw)
        if not started:
            started.append(1)
            t = threading.Thread(target=second)
            t.start()
            t.join()
        return model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", from_config)
    first = _merge(two, 0.3, tmp_path / "first")
    assert "error" not in outcome, repr(outcome.get("error"))
    for got in (first, outcome["factors"]):
        assert all(torch.equal(g, a) for g, a in zip(got, alone))
    assert torch.nn.Module.register_parameter is register


def test_an_adapter_whose_files_change_while_it_is_read_is_refused_not_served(serve_registry, tmp_path, monkeypatch):
    """The server hashes an adapter's files and then reads them; in the soak, a folder rewritten in between (its
    weights changed on disk while requests used it) was read, kept in host memory and served as the checked version:
    the same greedy request on gen_b answered '' once and 'SSSSSS' otherwise. Files that changed by the end of the
    read are refused (503 adapter_unavailable) and nothing is cached."""
    reg = tmp_path / "registry"
    shutil.copytree(serve_registry, reg)
    router = Router.from_registry(reg, quantization="none", dtype="fp32")
    weights = reg / "gen_b" / "1.0.0" / "adapter_model.safetensors"
    data = weights.read_bytes()
    read = manager.read_adapter

    def rewritten_meanwhile(name, folder):  # after the hash check, before the read
        weights.write_bytes(data[:-1] + bytes([data[-1] ^ 0x55]))
        return read(name, folder)

    monkeypatch.setattr(manager, "read_adapter", rewritten_meanwhile)
    router.host.pop("gen_b", None)
    with pytest.raises(manager.AdapterUnavailable, match="changed since it was checked"):
        router.fetch("gen_b")
    assert "gen_b" not in router.host and "gen_b" in router.unavailable


RECIPE = {"ids": ["gen_a", "gen_b"], "weights": [0.5, 0.5], "merge_strategy": "cat"}


def test_a_merge_source_whose_files_changed_is_not_merged(serve_registry, tmp_path):
    """Every load of an adapter re-hashes its files; a per-request merge read its sources' files unchecked, so a
    source changed on disk was merged and served as if it were the registered version. It is refused as a request
    naming the source is (503 adapter_unavailable, no retry)."""
    reg = tmp_path / "registry"
    shutil.copytree(serve_registry, reg)
    weights = reg / "gen_b" / "1.0.0" / "adapter_model.safetensors"
    data = weights.read_bytes()
    s = Served(reg)
    try:
        weights.write_bytes(data[:-1] + bytes([data[-1] ^ 0x55]))
        r = s.post("/v1/completions", {"model": "gen_a", "input": "ab", "merged_adapters": RECIPE})
        assert r.status_code == 503 and r.json()["error"]["code"] == "adapter_unavailable", r.text
        assert "gen_b" in r.json()["error"]["message"] and r.headers["x-should-retry"] == "false"
    finally:
        s.close()


def test_a_merge_source_unloaded_while_the_merge_is_built_is_a_clear_error(serve_registry, monkeypatch):
    """The recipe's sources are checked when the request is read; the build runs later on a worker thread. A source a
    reload or an unload took away meanwhile was a KeyError there: a plain-text 500 ('Internal Server Error') in the
    soak. It is answered in OpenAI's shape, naming the source."""
    s = Served(serve_registry)
    try:
        build = s.router.build_merge

        def after_an_unload(*args, **kw):
            s.router.forget("gen_a")
            return build(*args, **kw)

        monkeypatch.setattr(s.router, "build_merge", after_an_unload)
        r = s.post("/v1/completions", {"model": "gen_b", "input": "ab", "merged_adapters": RECIPE})
        assert r.status_code == 503 and r.json()["error"]["code"] == "adapter_unavailable", r.text
        assert "'gen_a'" in r.json()["error"]["message"]
    finally:
        s.close()


def test_an_unexpected_failure_is_a_500_in_openais_shape_and_logged_as_500(served, monkeypatch, caplog):
    """A bug in a route (the soak's KeyError and meta-tensor failures) reached Starlette's last handler: the client got
    a plain-text 'Internal Server Error' that no client reading error.message can read, and the access log said
    status=None. It is a JSON 500 (server_error, internal_error) naming the failure, logged with status=500."""

    async def broken(recipe, model=None):
        raise KeyError("gen_b")

    monkeypatch.setattr(served.catalogue, "merged", broken)
    with caplog.at_level(logging.INFO, logger="adapterhub_lite.serve.access"):
        r = served.post("/v1/completions", {"model": "gen_a", "input": "ab", "merged_adapters": RECIPE})
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "internal_error" and "KeyError" in r.json()["error"]["message"], r.text
    assert r.headers["x-should-retry"] == "false"  # the same request meets the same bug: the openai client sends it once
    assert any("POST /v1/completions status=500" in rec.getMessage() for rec in caplog.records)


def test_the_host_cache_keeps_what_was_read_when_the_file_is_rewritten_in_place(serve_registry, tmp_path):
    """safetensors' load_file gives CPU tensors that are views of the file mapped in memory. The host cache
    (--max-cpu-loras) kept them, so a weights file rewritten in place after it was read and checked changed the cached
    weights, and the next load of the adapter served them: the soak's person_json on the real backbone answered ''
    (the mutated weights') where a fresh server answers ' Ada Lovelace'. The cache holds its own copy."""
    reg = tmp_path / "registry"
    shutil.copytree(serve_registry, reg)
    router = Router.from_registry(reg, quantization="none", dtype="fp32")
    router.host.pop("gen_b", None)
    cached = router.fetch("gen_b")[1]
    before = {k: v.clone() for k, v in cached.items()}
    weights = reg / "gen_b" / "1.0.0" / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 0x55]))  # in place: same file, same size
    assert router.fetch("gen_b")[1] is cached  # a host-cache hit: no disk read
    assert all(torch.equal(cached[k], before[k]) for k in before)
