"""Router: swap, LRU residency, merge, mixed batches of every adapter kind, clear errors."""

import json
import re
import shutil
from pathlib import Path

import pytest

from adapterhub_lite.artifacts.loading import load_adapter
from adapterhub_lite.core.errors import AdapterHubError, AdapterLoadError, DataError
from adapterhub_lite.model.backbone import load_backbone
from adapterhub_lite.model.evaluate import predict
from adapterhub_lite.ops.merge import MergeError
from adapterhub_lite.serving.router import Router

from .conftest import on_another_backbone, train_tiny


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("router")
    gen = d / "copy.jsonl"
    gen.write_text("".join(json.dumps({"text": t, "target": t.upper()}) + "\n" for t in ["ab", "cd", "ef", "gh"]))
    # init_lora_weights=False: B starts random, so after 2 steps each LoRA still moves the model far
    # from the base; "router equals peft" then fails if the router dropped the update.
    rand = {"init_lora_weights": False}
    return {
        "cls_a": train_tiny(d, "cls_a", method_args={"target_modules": ["q_proj", "v_proj"], **rand}, train={"seed": 1, "lr": 5e-2}),
        "cls_b": train_tiny(d, "cls_b", method_args={"r": 4, "target_modules": ["k_proj", "o_proj"], **rand}, train={"seed": 2, "lr": 5e-2}),
        "cls_r16": train_tiny(d, "cls_r16", method_args={"r": 16, "target_modules": ["q_proj", "v_proj"], **rand}),
        "prefix": train_tiny(d, "prefix", method="prefix", method_args={"num_virtual_tokens": 3}),
        "prompt": train_tiny(d, "prompt", method="prompt", method_args={"num_virtual_tokens": 4}),
        "gen": train_tiny(d, "gen", type="generation", labels=None, label=None, target="target", metric=["exact_match"],
                          data={"train": str(gen), "dev": str(gen)}, prompt="In: {text}\nOut:", train={"max_new_tokens": 3},
                          method_args=rand),
    }


@pytest.fixture
def router(folders):
    r = Router(load_backbone("tiny-random-llama", "none", dtype="fp32"))
    for name, folder in folders.items():
        r.register(name, folder)
    return r


def alone(folder, texts):
    """Predictions of one adapter run the ordinary way: plain peft on its own backbone."""
    model, backbone, spec, _ = load_adapter(folder)
    rendered = [spec.prompt.format(**{spec.prompt_fields[0]: t}) for t in texts]
    preds = predict(model, backbone.tokenizer, spec, rendered, batch_size=1)
    return [spec.labels[p] if spec.type == "classification" else p for p in preds]


def test_every_adapter_changes_the_outputs(router):
    """Without this, "the router equals plain peft" would also hold for a router that ignores adapters."""
    ids = [[5, 40, 41, 42, 9, 10]]
    base = router.bank.forward(ids, [None])[0]
    for name in ("cls_a", "cls_b", "cls_r16", "prefix", "prompt", "gen"):
        router.use(name)
        assert (router.bank.forward(ids, [name])[0] - base).abs().max() > 1e-2, name


def test_swap_gives_what_plain_peft_gives(router, folders):
    texts = ["pos 3", "neg 5", "pos 11"]
    for name in ("cls_a", "cls_b", "prefix", "prompt"):
        router.use(name)
        assert [router.predict(t) for t in texts] == alone(folders[name], texts), name


def test_mixed_batch_equals_each_request_alone(router, folders):
    reqs = [{"adapter": "cls_a", "text": "pos 1"}, {"adapter": "prefix", "text": "neg 2"}, {"adapter": "gen", "text": "ab"},
            {"adapter": "prompt", "text": "pos 3"}, {"adapter": "base", "text": "hello", "max_new_tokens": 3},
            {"adapter": "cls_b", "text": "neg 4"}, {"adapter": "gen", "text": "ghij"}, {"adapter": "cls_r16", "text": "pos 5"}]
    out = router.run(reqs)
    assert [o["adapter"] for o in out] == [r["adapter"] for r in reqs]
    for req, res in zip(reqs, out):
        if req["adapter"] != "base":
            assert res["prediction"] == alone(folders[req["adapter"]], [req["text"]])[0], req
    backbone = load_backbone("tiny-random-llama", "none", dtype="fp32")
    ids = backbone.tokenizer("hello", return_tensors="pt").to(backbone.model.device)
    base = backbone.model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=backbone.tokenizer.pad_token_id)
    assert out[4]["prediction"] == backbone.tokenizer.decode(base[0, ids.input_ids.shape[1]:], skip_special_tokens=True).strip().split("\n")[0].strip()


def test_a_batch_keeps_its_adapters_resident_or_is_refused(folders):
    backbone = load_backbone("tiny-random-llama", "none", dtype="fp32")
    probe = Router(load_backbone("tiny-random-llama", "none", dtype="fp32"))  # a Router per backbone
    for name in ("cls_a", "cls_b"):
        probe.register(name, folders[name])
    probe.hold(["cls_a", "cls_b"])
    both = probe.resident_bytes()  # their own factors and the padded stacks that serve them (issue 21: the stacks count)
    # room for cls_a and cls_b: a third one evicts the one the batch does not need
    r = Router(backbone, memory_budget_mb=1.05 * both / 2**20)
    for name in ("cls_a", "cls_b", "cls_r16"):
        r.register(name, folders[name])
    reqs = [{"adapter": "cls_b", "text": "pos 1"}, {"adapter": "cls_a", "text": "neg 2"}]
    assert [o["prediction"] for o in r.run(reqs)] == [alone(folders["cls_b"], ["pos 1"])[0], alone(folders["cls_a"], ["neg 2"])[0]]
    # less than both need: run goes through the server's engine (issue 21), so the second request waits for the first
    # to end and its adapter then takes the room: the same answers, with an eviction, within the budget
    # (before, the batch was refused with "needs adapters ['cls_a', 'cls_b'] ... memory budget")
    tight = Router(load_backbone("tiny-random-llama", "none", dtype="fp32"), memory_budget_mb=0.9 * both / 2**20)
    for name in ("cls_a", "cls_b"):
        tight.register(name, folders[name])
    assert [o["prediction"] for o in tight.run(reqs)] == [alone(folders["cls_b"], ["pos 1"])[0], alone(folders["cls_a"], ["neg 2"])[0]]
    assert tight.evictions == 1 and len(tight.resident) == 1  # which one ran first depends on which adapter was read first


def test_lru_evicts_the_least_recently_used_within_the_budget(folders):
    def footprint(*names):  # device bytes with these resident: their factors and the slot pools that serve them
        probe = Router(load_backbone("tiny-random-llama", "none", dtype="fp32"))
        for name in names:
            probe.register(name, folders[name])
        probe.hold(list(names))
        return probe.resident_bytes()

    budget = max(footprint("cls_a", "cls_b"), footprint("cls_a", "cls_r16")) * 1.01
    assert footprint("cls_a", "cls_b", "cls_r16") > budget  # all three never fit
    r = Router(load_backbone("tiny-random-llama", "none", dtype="fp32"), memory_budget_mb=budget / 2**20)
    for name in ("cls_a", "cls_b", "cls_r16"):
        r.register(name, folders[name])
    r.use("cls_a")
    r.use("cls_b")  # both fit
    r.use("cls_a")  # touch: cls_b is now the least recently used
    r.use("cls_r16")  # the least recently used (cls_b, loaded after cls_a) goes
    assert list(r.resident) == ["cls_a", "cls_r16"] and r.resident_bytes() <= budget
    r.use("cls_b")  # evicted adapters reload on demand
    assert r.predict("pos 1") == alone(folders["cls_b"], ["pos 1"])[0]


def test_merge_registers_a_new_adapter(router, folders):
    sidecar = router.merge({"cls_a": 0.5, "cls_r16": 0.5}, method="cat", name="mix", task="cls_a")
    router.use("mix")
    texts = ["pos 2", "neg 7", "pos 4"]
    assert [router.predict(t) for t in texts] == alone(router.folders["mix"], texts)  # served as plain peft serves the folder
    assert sidecar["task"]["name"] == "cls_a" and sidecar["routing"] is None
    with pytest.raises(MergeError, match="needs equal LoRA ranks"):
        router.merge({"cls_a": 0.5, "cls_r16": 0.5}, method="linear", name="bad")


def test_a_merge_under_a_served_name_is_refused_and_a_failed_registration_leaves_no_folder(router, folders, monkeypatch):
    """Router.merge registered the merge under `name` whatever that name served: name="cls_b" replaced the cls_b adapter
    with the merge, unsaid, and a second merge under the default name was refused as "output folder ... exists; choose
    another --output". A served name is now refused in one line, and a merge whose registration fails leaves no folder in
    the router's own, so the same call, retried, is built and served."""
    before = router.folders["cls_b"]
    with pytest.raises(MergeError, match="an adapter named 'cls_b' is already served by this router; give the merge another name"):
        router.merge({"cls_a": 0.5, "cls_r16": 0.5}, method="cat", name="cls_b", task="cls_a")
    assert router.folders["cls_b"] == before
    register = router.register

    def failing(name, folder=None):
        monkeypatch.setattr(router, "register", register)  # once
        raise OSError("disk full")

    monkeypatch.setattr(router, "register", failing)
    with pytest.raises(OSError, match="disk full"):
        router.merge({"cls_a": 0.5, "cls_r16": 0.5}, method="cat", task="cls_a")
    assert not (Path(router._scratch.name) / "merged").exists() and "merged" not in router.folders
    router.merge({"cls_a": 0.5, "cls_r16": 0.5}, method="cat", task="cls_a")
    assert "merged" in router.folders


def test_errors_name_the_problem(router, folders, tmp_path):
    with pytest.raises(AdapterLoadError, match=r"unknown adapter 'nope'; known: cls_a, .*'base' / 'auto'"):
        router.run([{"adapter": "nope", "text": "x"}])
    other = on_another_backbone(folders["cls_a"], tmp_path / "other")
    with pytest.raises(AdapterLoadError, match="trained on backbone badbadbadbadbad0 but the router serves"):
        router.register("other", other)


def test_a_failing_request_among_good_ones_fails_the_run_after_the_others_end(router):
    """Router.run answers a list in order or raises: one failed request (the first failing one in order) raises once
    every other has ended, never a list with a hole in it."""
    ended = []
    requests = [{"adapter": "cls_a", "text": "pos 1"}, {"adapter": "nope", "text": "x"}, {"adapter": "gen", "text": "ab"},
                {"adapter": "gone", "text": "y"}]
    with pytest.raises(AdapterLoadError, match="unknown adapter 'nope'"):
        router.run(requests, on_done=ended.append)
    assert sorted(ended) == [0, 1, 2, 3]
    assert [r["prediction"] is not None for r in router.run([requests[0], requests[2]])] == [True, True]


def test_auto_routes_by_content_and_leaves_out_stale_routing_data(folders, tmp_path):
    r = Router(load_backbone("tiny-random-llama", "none", dtype="fp32"))
    r.register("cls_a", folders["cls_a"])
    r.register("gen", folders["gen"])
    stale = tmp_path / "stale"  # routing data from another embedding: served by name, never routed to
    shutil.copytree(folders["cls_b"], stale)
    meta = json.loads((stale / "adapterhub.json").read_text())
    meta["routing"]["embedding"]["layers"] = [0, 2]
    (stale / "adapterhub.json").write_text(json.dumps(meta))
    r.register("stale", stale)
    with pytest.warns(UserWarning, match=r"adapter 'stale' is left out of content routing: .*used embedding .*refit it with add_routing"):
        out = r.run([{"adapter": "auto", "text": "pos 7"}, {"adapter": "auto", "text": "ij"}, {"adapter": "stale", "text": "neg 2"}])
    assert [o["adapter"] for o in out] == ["cls_a", "gen", "stale"]
    assert out[0]["prediction"] == alone(folders["cls_a"], ["pos 7"])[0]
    assert out[2]["prediction"] == alone(folders["cls_b"], ["neg 2"])[0]


def test_auto_sends_a_request_the_router_is_unsure_of_to_the_base_model(folders):
    """route_threshold: below that confidence `auto` answers with the plain backbone rather than guess an adapter."""
    sure, unsure = (Router(load_backbone("tiny-random-llama", "none", dtype="fp32"), route_threshold=t) for t in (0.0, 0.999999))
    for r in (sure, unsure):
        r.register("cls_a", folders["cls_a"])
        r.register("gen", folders["gen"])
    requests = [{"adapter": "auto", "text": "pos 7"}, {"adapter": "auto", "text": "ij"}]
    assert [o["adapter"] for o in sure.run(requests)] == ["cls_a", "gen"]
    assert [o["adapter"] for o in unsure.run(requests)] == ["base", "base"]


def test_predict_through_auto_says_which_adapter_answered_as_run_does(folders):
    """predict(adapter="auto") returned the prediction alone: a Python caller could not tell which adapter gave it, nor
    that base answered (a raw continuation, "7777…", when routing falls back). It now returns run()'s answer for the
    request, routing record included; use("auto") (refused as an "unknown adapter 'auto'" whose message listed
    'auto' as known) makes it predict's default. Through a named adapter predict still returns the prediction."""
    sure, unsure = (Router(load_backbone("tiny-random-llama", "none", dtype="fp32"), route_threshold=t) for t in (0.0, 0.999999))
    for r in (sure, unsure):
        r.register("cls_a", folders["cls_a"])
        r.register("gen", folders["gen"])
    for r, adapters, fallback in ((sure, ["cls_a", "gen"], None), (unsure, ["base", "base"], "threshold")):
        ran = r.run([{"adapter": "auto", "text": "pos 7"}, {"adapter": "auto", "text": "ij"}])
        got = [r.predict("pos 7", adapter="auto"), r.predict({"text": "ij"}, adapter="auto")]
        assert got == ran and [g["adapter"] for g in got] == adapters
        assert [(g["routing"]["adapter"], g["routing"]["candidate"], g["routing"]["fallback"]) for g in got] == [
            (adapters[0], "cls_a", fallback), (adapters[1], "gen", fallback)]
        r.use("auto")
        assert r.predict("pos 7") == ran[0]
    assert sure.predict("pos 7", adapter="cls_a") == sure.predict("pos 7")["prediction"] == alone(folders["cls_a"], ["pos 7"])[0]


def test_infer_and_merge_from_the_command_line(folders, tmp_path, capsys):
    from adapterhub_lite.artifacts.registry import LocalRegistry
    from adapterhub_lite.cli import main

    reg = LocalRegistry(tmp_path / "reg")
    for name in ("cls_a", "cls_b", "gen"):
        reg.publish(folders[name], "1.0.0")
    (tmp_path / "req.jsonl").write_text('{"adapter": "cls_a", "text": "pos 1"}\n{"adapter": "gen", "text": "cd"}\n{"adapter": "base", "text": "hi", "max_new_tokens": 2}\n')
    assert main(["infer", "--registry", str(reg.root), "--input", str(tmp_path / "req.jsonl"), "--output", str(tmp_path / "ans.jsonl")]) == 0
    answers = [json.loads(line) for line in (tmp_path / "ans.jsonl").read_text().splitlines()]
    assert [a["adapter"] for a in answers] == ["cls_a", "gen", "base"]
    assert answers[0]["prediction"] == alone(folders["cls_a"], ["pos 1"])[0]
    assert main(["merge", "cls_a", "cls_b", "--weights", "0.5", "0.5", "--method", "cat", "--task", "cls_a", "--registry", str(reg.root),
                 "--output", str(tmp_path / "mix"), "--report-rows", "4"]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[-1])["merge_report"]
    assert set(report) == {"cls_a", "cls_b"} and (tmp_path / "mix" / "adapter_model.safetensors").exists()
    (tmp_path / "bad.jsonl").write_text('{"text": "no adapter"}\n')
    assert main(["infer", "--registry", str(reg.root), "--input", str(tmp_path / "bad.jsonl")]) == 2
    assert "name no 'adapter'" in capsys.readouterr().err
    # a budget that cannot be met is refused before anything runs (a -1 used to wait forever), and so is a
    # setting infer does not read (OpenAI's max_tokens was carried into the answer as if applied)
    for row, said in (('{"adapter": "base", "text": "hi", "max_new_tokens": -1}', "max_new_tokens -1"),
                      ('{"adapter": "base", "text": "hi", "max_new_tokens": "abc"}', "max_new_tokens 'abc'"),
                      ('{"adapter": "base", "text": "hi", "max_tokens": 1, "id": 7}', "['max_tokens'], which infer does not read"),
                      ('{"adapter": "cls_a", "text": "pos 1", "prompt": "hi"}', "['prompt'], which infer does not read"),
                      # token ids were continued raw, the row's text unread (answered 'DDDD…' for any text)
                      ('{"adapter": "gen", "text": "ab", "prompt_ids": [5, 6]}', "['prompt_ids'], which infer does not read")):
        (tmp_path / "odd.jsonl").write_text(row + "\n")
        out = tmp_path / "odd_answers.jsonl"
        assert main(["infer", "--registry", str(reg.root), "--input", str(tmp_path / "odd.jsonl"), "--output", str(out)]) == 2, row
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1 and not out.exists(), err
    router = Router.from_registry(reg.root, quantization="none", dtype="fp32")  # the Python API refuses it too, before running anything
    with pytest.raises(AdapterHubError, match=r"request\(s\) \[1\] ask for max_new_tokens 0"):
        router.run([{"adapter": "base", "text": "hi"}, {"adapter": "base", "text": "hi", "max_new_tokens": 0}])
    with pytest.raises(AdapterHubError, match="memory_budget_mb is -1; give a number of MB above 0"):  # it used to be ignored
        Router.from_registry(reg.root, quantization="none", dtype="fp32", memory_budget_mb=-1)


def test_infer_names_the_line_of_a_request_over_the_context(folders, tmp_path, capsys):
    """One over-long request of a file: predict names its row; infer said the numbers but not which of the file's requests."""
    from adapterhub_lite.artifacts.registry import LocalRegistry
    from adapterhub_lite.cli import main

    reg = LocalRegistry(tmp_path / "reg")
    reg.publish(folders["cls_a"], "1.0.0")
    rows = [{"adapter": "cls_a", "text": "pos 1"}, {"adapter": "cls_a", "text": "pos " * 400}, {"adapter": "base", "text": "hi", "max_new_tokens": 2}]
    (tmp_path / "req.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "ans.jsonl"
    assert main(["infer", "--registry", str(reg.root), "--input", str(tmp_path / "req.jsonl"), "--output", str(out), "--no-progress"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and not out.exists(), errors
    assert "req.jsonl: request on line 2: the request needs" in errors[0] and "maximum context length is 512 tokens" in errors[0], errors


def test_router_run_names_the_request_over_the_context_by_its_index(router):
    """Router.run's error for one over-long request among others said the numbers but not which request (its index was
    only on request_index); it names it now, in one line, keeping the error's type. predict serves one: no index."""
    from adapterhub_lite.core.errors import ContextLengthError

    rows = [{"adapter": "cls_a", "text": "pos 1"}, {"adapter": "cls_a", "text": "pos " * 400}, {"adapter": "base", "text": "hi", "max_new_tokens": 2}]
    with pytest.raises(ContextLengthError, match=r"^run\(\): requests\[1\] \(adapter 'cls_a'\): the request needs \d+ tokens") as err:
        router.run(rows)
    assert err.value.request_index == 1 and "\n" not in str(err.value) and "maximum context length is 512" in str(err.value)
    with pytest.raises(ContextLengthError, match=r"^the request needs \d+ tokens"):
        router.predict("pos " * 400, adapter="cls_a")


def test_a_second_router_on_the_same_backbone_is_refused_not_mixed_in(folders):
    """Two banks sharing a module would run one bank's rows with the other's row assignment (silently wrong answers)."""
    backbone = load_backbone("tiny-random-llama", "none", dtype="fp32")
    first, second = Router(backbone), Router(backbone)
    first.register("cls_a", folders["cls_a"])
    first.use("cls_a")
    second.register("cls_a", folders["cls_a"])
    with pytest.raises(AdapterLoadError, match=r"cannot load adapter 'cls_a': module '.*(q_proj|v_proj)' already serves the per-row adapters of another Router") as err:
        second.use("cls_a")
    assert "\n" not in str(err.value)
    assert first.predict("pos 3") == alone(folders["cls_a"], ["pos 3"])[0]  # the first is untouched
    second.register("cls_b", folders["cls_b"])  # k/o: no module in common, so it may share the backbone
    second.use("cls_b")
    assert second.predict("pos 1") == alone(folders["cls_b"], ["pos 1"])[0]


def test_an_adapter_the_batch_needs_is_never_evicted_to_make_room(folders):
    """Over the memory budget, residency evicts only adapters outside `keep` (those the running batch uses): when
    every other resident adapter is needed, the newcomer is taken back and waits (ResidencyFull) instead."""
    from adapterhub_lite.serving.manager import ResidencyFull

    probe = Router(load_backbone("tiny-random-llama", "none", dtype="fp32"))
    for name in ("cls_a", "cls_b"):
        probe.register(name, folders[name])
    probe.hold(["cls_a", "cls_b"])
    r = Router(load_backbone("tiny-random-llama", "none", dtype="fp32"), memory_budget_mb=0.9 * probe.resident_bytes() / 2**20)
    for name in ("cls_a", "cls_b"):
        r.register(name, folders[name])
    r.hold(["cls_a"])
    with pytest.raises(ResidencyFull, match="needs adapters"):
        r.hold(["cls_b"], keep=frozenset({"cls_a"}))
    assert list(r.resident) == ["cls_a"] and r.evictions == 0


def test_a_slot_the_batch_needs_is_never_evicted_for_another(folders):
    """With --max-loras, a LoRA needing a slot evicts only a slot holder outside `keep`; when the batch needs them all it waits."""
    from adapterhub_lite.serving.manager import ResidencyFull

    r = Router(load_backbone("tiny-random-llama", "none", dtype="fp32"), max_loras=1)
    for name in ("cls_a", "cls_b"):
        r.register(name, folders[name])
    r.hold(["cls_a"])
    with pytest.raises(ResidencyFull, match="adapter slots"):
        r.hold(["cls_b"], keep=frozenset({"cls_a"}))
    assert list(r.resident) == ["cls_a"] and r.evictions == 0


def test_run_refuses_each_generation_setting_it_would_not_apply():
    """Router.run (and infer) answer greedily within each task's budget: a request that sets a sampling or stopping
    setting a client of an OpenAI / vLLM / transformers API would send is refused by name before anything runs, never
    answered as if the setting had been applied."""
    router = Router(load_backbone("tiny-random-llama", "none", dtype="fp32"))
    settings = {"stop": ["\n"], "stop_token_ids": [2], "seed": 1, "n": 2, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "min_p": 0.1,
                "do_sample": True, "repetition_penalty": 1.2, "logprobs": 2, "stream": True, "max_tokens": 4, "max_length": 9}
    for key, value in settings.items():
        with pytest.raises(AdapterHubError, match=rf"set \['{key}'\], which run\(\) does not read"):
            router.run([{"adapter": "base", "text": "hi", key: value}])


def test_a_new_router_removes_the_merge_folders_of_killed_ones_only(tmp_path, monkeypatch):
    # A SIGKILLed server cannot remove its merged adapters' folder; the next router on the host removes it, and
    # nothing of a live process, of another host sharing /tmp, or of a folder it cannot read the owner of.
    import os
    import subprocess
    import sys
    import tempfile

    from adapterhub_lite.artifacts.files import host
    from adapterhub_lite.serving.manager import scratch_folder
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    gone = gone.stdout.strip()
    dead, live, other, odd = (tmp_path / f"adapterhub-router-{n}" for n in
                              (f"{gone}-{host()}-ab1", f"{os.getppid()}-{host()}-ab2", f"{gone}-else-where.example-ab3", "x7k2"))
    for d in (dead, live, other, odd):
        (d / "merged-1").mkdir(parents=True)
    scratch = scratch_folder()
    try:
        assert not dead.exists()
        assert live.exists() and other.exists() and odd.exists()
        assert Path(scratch.name).name.startswith(f"adapterhub-router-{os.getpid()}-{host()}-")
    finally:
        scratch.cleanup()


def test_a_number_as_text_is_one_answer_and_a_raw_text_that_is_no_string_one_refusal(folders, tmp_path, capsys):
    """A named adapter's `text` 42 renders as "42" in predict, Router.run and serve; infer refused it ("not a string").
    A `text` that base / auto read whole: infer refused it, Router.run failed in the tokenizer (a ValueError naming no request)."""
    from adapterhub_lite.artifacts.registry import LocalRegistry
    from adapterhub_lite.cli import main
    from adapterhub_lite.core.errors import DataError

    reg = LocalRegistry(tmp_path / "reg")
    reg.publish(folders["gen"], "1.0.0")
    (tmp_path / "req.jsonl").write_text('{"adapter": "gen", "text": 42}\n')
    out = tmp_path / "ans.jsonl"
    assert main(["infer", "--registry", str(reg.root), "--input", str(tmp_path / "req.jsonl"), "--output", str(out), "--no-progress",
                 "--dtype", "fp32", "--quantization", "none"]) == 0, capsys.readouterr().err
    router = Router.from_registry(reg.root, quantization="none", dtype="fp32")
    assert json.loads(out.read_text())["prediction"] == router.run([{"adapter": "gen", "text": 42}])[0]["prediction"] == alone(folders["gen"], ["42"])[0]
    for name in ("base", "auto"):
        with pytest.raises(DataError, match=rf"requests\[0\] \(adapter '{name}'\): the request has a 'text' that is 42, not a string"):
            router.run([{"adapter": name, "text": 42}])


def test_a_task_column_named_like_a_request_key_is_refused_not_read_as_that_key(tmp_path):
    """A task whose prompt reads a column 'prompt' ("Q: {prompt}\\nA:"): Router.run's row {"adapter": ..., "prompt": ...}
    was continued as a raw prompt (generated text from a classification adapter) instead of answering the task. The
    clash is refused with the way round it; the column's text given as 'text' answers the task."""
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{w} {i}", "label": w}) + "\n" for i in range(8) for w in ("pos", "neg")))
    folder = train_tiny(tmp_path, "pq", data={"train": str(data), "dev": str(data)}, prompt="Q: {prompt}\nA:")
    r = Router(load_backbone("tiny-random-llama", "none", dtype="fp32"))
    r.register("pq", folder)
    with pytest.raises(DataError, match=r"run\(\): requests\[0\] \(adapter 'pq'\): adapter 'pq' reads a column named 'prompt' .* give the column's text as 'text'"):
        r.run([{"adapter": "pq", "prompt": "pos 1"}])
    assert r.run([{"adapter": "pq", "text": "pos 1"}])[0]["prediction"] in ("pos", "neg")


def test_a_request_s_max_new_tokens_is_its_budget_through_a_task_adapter_too(router, folders):
    """run() read a request's max_new_tokens for base and raw prompts only: a generation task's row asking for 8 new
    tokens got its task's 3, unsaid (the server's max_tokens applies to a task's input). Greedy, it now equals plain
    peft's generate with that budget, the answer's first line."""
    model, backbone, spec, _ = load_adapter(folders["gen"])
    tok = backbone.tokenizer
    for text in ("ab", "hello world", "x"):
        ids = tok(spec.prompt.format(text=text), return_tensors="pt").to(model.device)
        ref = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        want = tok.decode(ref[0, ids.input_ids.shape[1]:], skip_special_tokens=True).strip().split("\n")[0].strip()
        got = router.run([{"adapter": "gen", "text": text, "max_new_tokens": 8}, {"adapter": "gen", "text": text}])
        assert got[0]["prediction"] == want, text
        assert got[0]["prediction"] != got[1]["prediction"], text  # the task's own budget (3) gives another answer


def test_a_request_that_is_no_request_is_one_line_naming_it(router):
    """run() read its requests unchecked: a dict or a string given for the list, a row that is no dict or an 'adapter' that
    is no string came out as AttributeError: 'str' object has no attribute 'get' (or TypeError), a token id outside the
    vocabulary as the embedding's IndexError, a negative one as the tokenizer's OverflowError, a number as 'prompt' as the
    tokenizer's ValueError. Each is one DataError now, naming the request and the value, before anything runs."""
    with pytest.raises(DataError, match=r"^run\(\) takes a list of requests, got dict \{'adapter': 'gen'"):
        router.run({"adapter": "gen", "text": "ab"})
    with pytest.raises(DataError, match=r"^run\(\) takes a list of requests, got str 'ab'"):
        router.run("ab")
    cases = [("ab", r": the request is str 'ab', not a dict"),
             ({"adapter": 3, "text": "ab"}, r" \(adapter 3\): 'adapter' is 3, not a string"),
             ({"adapter": "base", "prompt": 5}, r" \(adapter 'base'\): 'prompt' is 5, not a string"),
             ({"adapter": "base", "prompt_ids": "abc"}, r"'prompt_ids' is 'abc'; give a list of whole-number token ids"),
             ({"adapter": "base", "prompt_ids": [5, 10**9]}, r"'prompt_ids' holds token id 1000000000, outside this model's vocabulary \[0, 259\)"),
             ({"adapter": "base", "prompt_ids": [-1]}, r"'prompt_ids' holds token id -1, outside"),
             ({"adapter": "base", "prompt_ids": [5, 259]}, r"'prompt_ids' holds token id 259, outside"),  # the vocabulary's size
             ({"adapter": "base", "prompt_ids": [True]}, r"'prompt_ids' is \[True\]; give a list of whole-number token ids"),  # not id 1
             ({"adapter": "base", "prompt_ids": 5}, r"'prompt_ids' is 5; give a list of whole-number token ids"),
             # prompt_ids was continued and the prompt dropped, unsaid
             ({"adapter": "base", "prompt": "hi", "prompt_ids": [5]}, r"it gives both 'prompt' and 'prompt_ids'; give the raw prompt once")]
    ended = []
    for bad, said in cases:
        with pytest.raises(DataError, match=r"^run\(\): requests\[1\]" + ("" if said[0] in ": " else r".*") + said) as err:
            router.run([{"adapter": "gen", "text": "ab"}, bad], on_done=ended.append)
        assert "\n" not in str(err.value) and err.value.request_index == 1
    assert ended == []  # refused before anything ran
    assert router.run([{"adapter": "base", "prompt_ids": [5, 258]}])[0]["adapter"] == "base"


def test_merge_names_an_unknown_source_and_a_weights_argument_that_is_no_dict(router):
    """Router.merge passed its sources to the server's build_merge unchecked: an unknown name was 'merge source 'zz' was
    unloaded while the merge was built; see GET /v1/models' (no server, nothing unloaded), {} 'the sources serve different
    tasks ()', a list AttributeError: 'list' object has no attribute 'items'."""
    with pytest.raises(AdapterLoadError, match=r"^unknown adapter 'zz'; known: cls_a, "):
        router.merge({"cls_a": 0.5, "zz": 0.5}, name="m_unknown")
    for weights in ({}, ["cls_a", "cls_b"]):
        with pytest.raises(MergeError, match=r"^merge\(\) takes a dict of source name → weight with at least one source, got "):
            router.merge(weights, name="m_bad")
    for routed in ("base", "auto"):  # 'auto' reached the catalogue: "unknown adapter 'auto'; known: …, or 'base' / 'auto'"
        with pytest.raises(MergeError, match=rf"^merge source '{routed}' is no adapter"):
            router.merge({"cls_a": 0.5, routed: 0.5}, name="m_base")
    assert not {"m_unknown", "m_bad", "m_base"} & set(router.folders)


def test_a_name_registered_again_serves_the_new_folder(router, folders):
    """register() over a name the bank held resident changed the catalogue but not the bank: the old factors kept
    answering under the name, unsaid (a LoRA after a LoRA, a prefix after a LoRA alike), until an eviction."""
    ids = [[5, 40, 41, 42, 9, 10]]
    router.register("x", folders["cls_a"])
    router.hold(["x", "cls_a"])
    assert (router.bank.forward(ids, ["x"])[0] - router.bank.forward(ids, ["cls_a"])[0]).abs().max() <= 1e-5
    for then in ("cls_b", "prefix", "cls_a"):
        router.register("x", folders[then])
        router.hold(["x", then])
        want = router.bank.forward(ids, [then])[0]
        assert (router.bank.forward(ids, ["x"])[0] - want).abs().max() <= 1e-5, then
        assert router.run([{"adapter": "x", "text": "pos 3"}]) == [{"adapter": "x", "prediction": alone(folders[then], ["pos 3"])[0]}]


def test_count_arguments_of_the_python_api_that_are_no_whole_number_are_refused_naming_them(router):
    """Router.run(max_batch_rows=1.5) or True ran as a batch budget, and max_model_len=nan was taken (a request then ran out
    of memory); a str was a TypeError from a comparison. Each is one AdapterHubError (a ValueError) naming the value."""
    for bad in (1.5, True, "4", None, 0):
        with pytest.raises(AdapterHubError, match=rf"max_rows={re.escape(repr(bad))}: give .*Router.run's max_batch_rows"):
            router.run([{"adapter": "base", "text": "hi"}], max_new_tokens=1, max_batch_rows=bad)
    for key, bad in (("max_model_len", float("nan")), ("max_model_len", 1.5), ("max_cpu_loras", True), ("max_cpu_loras", None),
                     ("max_lora_rank", "8"), ("max_loras", 0.5)):
        with pytest.raises(AdapterHubError, match=rf"^{key}={re.escape(repr(bad))}: give a whole number ≥ 1 \(--{key.replace('_', '-')}\)"):
            Router(router.backbone, **{key: bad})
    for bad in (True, "5"):
        with pytest.raises(AdapterHubError, match=rf"^memory_budget_mb is {re.escape(repr(bad))}; give a number of MB above 0"):
            Router(router.backbone, memory_budget_mb=bad)


def test_an_adapter_name_that_is_no_string_is_one_typed_refusal(router, folders):
    """use(123), register(1, folder) and merge(name=5) were bare TypeErrors ('argument of type 'int' is not iterable',
    "unsupported operand type(s) for /: 'PosixPath' and 'int'")."""
    with pytest.raises(AdapterLoadError, match=r"^adapter name 123 is a int, not a string; name an adapter"):
        router.use(123)
    with pytest.raises(AdapterLoadError, match=r"^adapter name 1 is a int, not a string"):
        router.register(1, next(iter(folders.values())))
    with pytest.raises(MergeError, match=r"^the merged adapter's name 5 is a int, not a string"):
        router.merge({"cls_a": 0.5, "cls_b": 0.5}, name=5)


def test_an_on_done_that_is_not_callable_is_refused_before_anything_runs(router):
    # run(on_done=1) answered every request and printed a TypeError traceback per request from the engine thread
    with pytest.raises(AdapterHubError, match=r"^on_done is 1, not callable; pass a function of the request's index, or None$"):
        router.run([{"adapter": "base", "text": "hi"}], max_new_tokens=1, on_done=1)
