"""The OpenAI-compatible server: a real HTTP server on 127.0.0.1, talked to with the `openai` client."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from adapterhub_lite.artifacts.loading import load_adapter
from adapterhub_lite.artifacts.registries import open_registry
from adapterhub_lite.cli import main as cli_main
from adapterhub_lite.model.evaluate import label_token_ids
from adapterhub_lite.model.heads import label_scores
from adapterhub_lite.serving.params import IGNORED_HEADER

from .conftest import on_another_backbone
from .serving import KEY, Served, free_port


@pytest.fixture(scope="module")
def registry(serve_registry):
    return serve_registry


@pytest.fixture(scope="module")
def served(registry):
    s = Served(registry)
    yield s
    s.close()


def infer(registry, tmp_path, requests):
    """What `adapterhub-lite infer` answers for these requests (fp32, like the server under test)."""
    src, out = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in requests))
    assert cli_main(["infer", "--registry", str(registry), "--input", str(src), "--output", str(out), "--quantization", "none", "--dtype", "fp32"]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


TEXTS = ["pos 1", "neg 2", "pos 5", "ab", "gh", "neg 7", "cd", "ef"]


def test_answers_equal_infer_for_every_kind_of_adapter(served, registry, tmp_path):
    names = ["cls_a", "cls_b", "cls_prefix", "cls_prompt", "cls_ia3", "gen_a", "gen_b", "gen_prefix", "gen_prompt", "base", "auto"]
    requests = [{"adapter": n, "text": t} for n in names for t in TEXTS[:3]]
    expected = infer(registry, tmp_path, requests)
    assert {e["prediction"] for e in expected if e["adapter"].startswith("gen")} - {""}, "generation adapters answered nothing"
    for req, exp in zip(requests, expected):
        got = served.client.completions.create(model=req["adapter"], prompt="", extra_body={"input": req["text"]})
        # `prompt` is required by the client's signature; `input` (the task's columns) takes precedence
        assert got.choices[0].text == exp["prediction"], req
        assert got.choices[0].model_extra["adapter"] == exp["adapter"], req


def test_completions_chat_streaming_classify_and_models(served):
    c = served.client
    ids = {m.id for m in c.models.list().data}
    assert {"cls_a", "cls_a@1.0.0", "gen_b", "gen_b@0.9.0", "gen_b@1.0.0", "base", "auto"} <= ids
    cards = {m.id: m.model_extra for m in c.models.list().data}
    backbone = served.router.backbone
    # vLLM's cards: the base names its weights and context; every adapter its own folder, on `base`
    assert cards["base"].pop("permission")[0]["object"] == "model_permission"  # vLLM's, on every card (tests/test_vllm_shapes.py)
    assert cards["base"] == {"root": backbone.hub_id or backbone.name, "parent": None, "max_model_len": served.router.max_model_len}
    for name in ("cls_a", "cls_a@1.0.0", "gen_b", "gen_b@0.9.0"):
        assert cards[name]["parent"] == "base" and (Path(cards[name]["root"]) / "adapter_config.json").is_file(), name
    assert cards["gen_b"]["root"] == cards["gen_b@1.0.0"]["root"] != cards["gen_b@0.9.0"]["root"]  # the latest is 1.0.0
    assert cards["auto"]["parent"] == "base"
    # every card has vLLM's max_model_len key: what a request to it may fill (a prompt adapter's virtual tokens come first)
    context, virtual = served.router.max_model_len, served.router.virtual_tokens("gen_prompt")[1]
    assert virtual > 0 and cards["gen_prompt"]["max_model_len"] == context - virtual
    assert cards["gen_a"]["max_model_len"] == context and cards["auto"]["max_model_len"] is None

    raw = c.completions.create(model="gen_a", prompt="In: ab\nOut:", max_tokens=6, logprobs=2)
    assert raw.choices[0].finish_reason in ("stop", "length") and raw.usage.completion_tokens <= 6
    lp = raw.choices[0].logprobs
    assert len(lp.token_logprobs) == raw.usage.completion_tokens and all(v <= 0 for v in lp.token_logprobs)
    assert all(len(t) == 2 for t in lp.top_logprobs)

    streamed = c.completions.create(model="gen_a", prompt="In: ab\nOut:", max_tokens=6, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == raw.choices[0].text  # same greedy tokens, streamed

    chat = c.chat.completions.with_raw_response.create(model="gen_prompt", messages=[
        {"role": "system", "content": "x"}, {"role": "user", "content": "cd"}, {"role": "assistant", "content": "CD"}, {"role": "user", "content": "ab"}])
    alone = c.completions.create(model="gen_prompt", prompt="", extra_body={"input": "ab"})
    assert chat.parse().choices[0].message.content == alone.choices[0].text  # a task adapter reads the last user message
    assert chat.headers[IGNORED_HEADER] == "messages[0],messages[1],messages[2]"  # …and names the ones it did not read
    one = c.chat.completions.with_raw_response.create(model="gen_prompt", messages=[{"role": "user", "content": "ab"}])
    assert IGNORED_HEADER not in one.headers and one.parse().choices[0].message.content == alone.choices[0].text
    pieces = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="gen_prompt", messages=[{"role": "user", "content": "ab"}], stream=True) if ch.choices]
    assert "".join(pieces) == alone.choices[0].text

    cls = served.post("/v1/classify", {"model": "cls_a", "input": ["pos 1", {"text": "neg 2"}]}).json()
    assert [d["label"] for d in cls["data"]] == [c.completions.create(model="cls_a", prompt="", extra_body={"input": t}).choices[0].text
                                                  for t in ("pos 1", "neg 2")]
    for d in cls["data"]:
        assert set(d["probabilities"]) == {"pos", "neg"} and abs(sum(d["probabilities"].values()) - 1) < 1e-4
        assert d["label"] == max(d["probabilities"], key=d["probabilities"].get)
        # vLLM's ClassificationData beside it: probs over the labels in the adapter's order, num_classes
        assert d["probs"] == list(d["probabilities"].values()) and d["num_classes"] == 2 and list(d["probabilities"]) == ["pos", "neg"]
    assert cls["id"].startswith("cls-") and isinstance(cls["created"], int)
    # the label scores are plain peft's, normalized over the labels (independent of the router's scoring)
    model, backbone, spec, _ = load_adapter(served.router.folders["cls_a"], dtype="fp32")
    prompts = [spec.prompt.format(text=t) for t in ("pos 1", "neg 2")]
    scores = label_scores(model, backbone.tokenizer, prompts, label_token_ids(backbone.tokenizer, spec), spec.train.max_length).softmax(-1)
    for d, row in zip(cls["data"], scores.tolist()):
        assert [d["probabilities"][w] for w in ("pos", "neg")] == pytest.approx(row, abs=1e-4)

    pinned = c.completions.create(model="gen_b@0.9.0", prompt="", extra_body={"input": "cd"}).choices[0].text
    assert pinned == c.completions.create(model="gen_a", prompt="", extra_body={"input": "cd"}).choices[0].text


def test_sixty_four_concurrent_requests_each_equal_their_sequential_answer(served):
    models = ["cls_a", "cls_b", "cls_prefix", "cls_prompt", "gen_a", "gen_b", "gen_prefix", "gen_prompt", "base", "auto"]
    jobs = [(models[i % len(models)], TEXTS[i % len(TEXTS)]) for i in range(64)]

    def body(model, text):
        return {"model": model, "input": text} if model != "base" else {"model": model, "prompt": text, "max_tokens": 5}

    sequential = [served.post("/v1/completions", body(*j)).json()["choices"][0]["text"] for j in jobs]

    async def burst():
        async with httpx.AsyncClient(base_url=served.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as h:
            return await asyncio.gather(*(h.post("/v1/completions", json=body(*j)) for j in jobs))

    answers = asyncio.run(burst())
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200][:2]
    assert [a.json()["choices"][0]["text"] for a in answers] == sequential
    metrics = httpx.get(served.url + "/metrics").text
    assert 'adapterhub_requests_total{adapter="gen_prefix",status="ok"}' in metrics
    assert "adapterhub_batch_row_factor_bytes " in metrics  # the batch's gathered per-row factors (their value: test_serve_budgets)
    assert isinstance(httpx.get(served.url + "/health").json()["memory"]["batch_row_bytes"], int)


def test_rows_join_a_running_batch(served):
    """Continuous batching: a request sent while a long one is decoding joins its batch and is answered
    while the long one still runs. (Were newcomers to wait for the batch to end, the long one would be done.)"""
    async def go():
        async with httpx.AsyncClient(base_url=served.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as h:
            async with h.stream("POST", "/v1/completions", json={"model": "base", "prompt": "a b c", "max_tokens": 300, "stream": True}) as long:
                lines = long.aiter_lines()
                while not (await anext(lines)).startswith("data: {"):  # the long request is decoding now
                    pass
                short = await h.post("/v1/completions", json={"model": "gen_a", "input": "ab"})
                running = [len(j.tokens) for j in list(served.engine._rows.values())]  # the engine's rows at that moment
                rest = [line async for line in lines if line.startswith("data: {")]
        return short, running, rest

    short, running, rest = asyncio.run(go())
    assert short.status_code == 200
    assert len(running) == 1 and 0 < running[0] < 300, running  # the long row was mid-way when the short one was answered
    assert json.loads(rest[-1][6:])["choices"][0]["finish_reason"] == "length"  # and then ran on to its 300 tokens


def _chunked(body: bytes):
    """A body sent in chunks with no Content-Length (what a streaming client sends): only counting what arrives finds its size."""
    for i in range(0, len(body), 1 << 16):
        yield body[i:i + (1 << 16)]


@pytest.mark.parametrize("case", ["unknown model", "too many tokens", "bad json", "missing key", "wrong key", "oversize body",
                                  "oversize chunked body", "prompt too long", "n > 16", "bad temperature", "classify a generator",
                                  "missing column"])
def test_bad_requests_get_a_4xx_in_openai_error_shape(served, case):
    post = served.post
    r = {
        "unknown model": lambda: post("/v1/completions", {"model": "nope", "prompt": "x"}),
        "too many tokens": lambda: post("/v1/completions", {"model": "base", "prompt": "x", "max_tokens": 10**6}),
        "bad json": lambda: httpx.post(served.url + "/v1/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}),
        "missing key": lambda: post("/v1/completions", {"model": "base", "prompt": "x"}, key=None),
        "wrong key": lambda: post("/v1/completions", {"model": "base", "prompt": "x"}, key="nope"),
        "oversize body": lambda: post("/v1/completions", {"model": "base", "prompt": "x" * (2 << 20)}),
        "oversize chunked body": lambda: httpx.post(served.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                                                    content=_chunked(json.dumps({"model": "base", "prompt": "x" * (2 << 20)}).encode())),
        "prompt too long": lambda: post("/v1/completions", {"model": "base", "prompt": "ab " * 3000}),
        "n > 16": lambda: post("/v1/completions", {"model": "base", "prompt": "x", "n": 17}),
        "bad temperature": lambda: post("/v1/completions", {"model": "base", "prompt": "x", "temperature": "hot"}),
        "classify a generator": lambda: post("/v1/classify", {"model": "gen_a", "input": "x"}),
        "missing column": lambda: post("/v1/completions", {"model": "gen_a", "input": {"nope": "x"}}),
    }[case]()
    status = {"unknown model": 404, "missing key": 401, "wrong key": 401, "oversize body": 413, "oversize chunked body": 413}.get(case, 400)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "code"} and err["message"]
    if case == "unknown model":
        with pytest.raises(openai.NotFoundError, match="does not exist"):  # what the openai client makes of it
            served.client.completions.create(model="nope", prompt="x")


def test_the_queue_bound_answers_429_with_retry_after(registry):
    s = Served(registry, max_batch_rows=1, max_queue=1)
    try:
        async def flood():
            async with httpx.AsyncClient(base_url=s.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as h:
                return await asyncio.gather(*(h.post("/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": 50}) for _ in range(8)))
        answers = asyncio.run(flood())
        codes = sorted(a.status_code for a in answers)
        assert 429 in codes and 200 in codes, codes
        full = next(a for a in answers if a.status_code == 429)
        assert full.headers["retry-after"] == "1" and full.json()["error"]["code"] == "queue_full"
    finally:
        s.close()


def test_per_request_merges_are_built_once_and_served(served, registry, tmp_path):
    recipe = {"ids": ["gen_a", "gen_b"], "weights": [0.5, 0.5], "merge_strategy": "delta_linear"}
    first = served.post("/v1/completions", {"model": "gen_a", "input": "ab", "merged_adapters": recipe})
    assert first.status_code == 200, first.text
    name = first.json()["choices"][0]["adapter"]
    assert name.startswith("merged-")
    again = served.post("/v1/completions", {"model": "gen_a", "input": "ab", "merged_adapters": recipe}).json()
    assert again["choices"][0]["adapter"] == name and again["choices"][0]["text"] == first.json()["choices"][0]["text"]
    # the same merge served by the router directly (as `infer` would after `merge`)
    direct = served.engine.call(lambda r: r.run([{"adapter": name, "text": "ab"}])[0]["prediction"]).result(60)
    assert direct == first.json()["choices"][0]["text"]
    bad = served.post("/v1/completions", {"model": "gen_a", "input": "ab", "merged_adapters": {**recipe, "weights": [1]}})
    assert bad.status_code == 400 and "weights" in bad.json()["error"]["message"]


def test_a_merge_may_name_a_pinned_version(served):
    """`gen_b@0.9.0` (gen_a's weights) is a model id the server serves, so a recipe may name it: it was a 400 ("contain
    '.' ... choose names without '.' (--name)"). peft's linear merge of two copies at 0.25 each is that adapter again."""
    recipe = {"ids": ["gen_a", "gen_b@0.9.0"], "weights": [0.25, 0.25], "merge_strategy": "linear"}
    body = {"model": "gen_a", "prompt": "In: ab\nOut:", "max_tokens": 4, "ignore_eos": True, "logprobs": 1}
    merged = served.post("/v1/completions", {**body, "merged_adapters": recipe})
    assert merged.status_code == 200, merged.text
    alone = served.post("/v1/completions", body).json()["choices"][0]
    got = merged.json()["choices"][0]
    assert got["adapter"].startswith("merged-") and got["text"] == alone["text"]
    assert got["logprobs"]["token_logprobs"] == pytest.approx(alone["logprobs"]["token_logprobs"], abs=1e-4)


def test_a_recipe_over_a_source_loaded_again_from_other_files_is_merged_again(served, registry, tmp_path):
    """A recipe's merge was cached under a hash of its ids and weights alone: after a source was unloaded and loaded
    again under its name from other files (or moved to a new registry version by a reload), the same recipe was answered
    by the merge of the old files, unsaid. The hash now takes in each source's files as registered: a new merge."""
    import hashlib
    import shutil

    recipe = {"ids": ["late", "gen_a"], "weights": [0.5, 0.5], "merge_strategy": "delta_linear"}
    merged = {}
    for source in ("gen_a", "gen_b"):
        folder = tmp_path / source
        shutil.copytree(registry / source / "1.0.0", folder)
        assert served.post("/v1/load_lora_adapter", {"lora_name": "late", "lora_path": str(folder)}).status_code == 200
        try:
            r = served.post("/v1/completions", {"model": "gen_a", "input": "ab", "merged_adapters": recipe})
            assert r.status_code == 200, r.text
        finally:
            assert served.post("/v1/unload_lora_adapter", {"lora_name": "late"}).status_code == 200
        name = r.json()["choices"][0]["adapter"]
        merged[source] = name
        sha = hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()
        assert served.router.metas[name]["merge"]["sources"]["late"]["adapter_sha256"] == sha
    assert merged["gen_a"] != merged["gen_b"]


def test_a_recipe_s_majority_sign_method_is_used_and_a_field_not_read_is_refused(served):
    """LoRAX's recipes carry majority_sign_method; it was not read (nor was any unknown field), so "frequency" was merged
    as "total", unsaid. It is passed to peft now (another recipe, another adapter), and a field not read is a 400."""
    recipe = {"ids": ["gen_a", "gen_b"], "weights": [0.5, 0.5], "merge_strategy": "ties_svd", "density": 0.5}  # (ranks 8, 16)
    names = {}
    for sign in ("total", "frequency"):
        r = served.post("/v1/completions", {"model": "gen_a", "input": "ab", "merged_adapters": {**recipe, "majority_sign_method": sign}})
        assert r.status_code == 200, r.text
        names[sign] = r.json()["choices"][0]["adapter"]
        assert served.router.metas[names[sign]]["merge"]["majority_sign_method"] == sign
    assert names["total"] != names["frequency"]
    for field, value in (("majority_sign", "frequency"), ("majority_sign_method", "most")):
        bad = served.post("/v1/completions", {"model": "gen_a", "input": "ab", "merged_adapters": {**recipe, field: value}})
        assert bad.status_code == 400 and f"`merged_adapters.{field}` is \"{value}\"" in bad.json()["error"]["message"], bad.text


def test_per_request_merges_share_one_metrics_label(served, registry, tmp_path):
    """Each recipe is a new adapter name; as a label value each would be a series kept for the server's life, so a client
    could grow /metrics without bound. Merges count under adapter="merged"; an adapter an operator names merged-… keeps
    its name, and a run-time load may not take a recipe's name (it would answer that recipe's requests)."""
    import shutil

    names = []
    for weights in ([0.3, 0.7], [0.6, 0.4]):
        recipe = {"ids": ["gen_a", "gen_b"], "weights": weights, "merge_strategy": "delta_linear"}
        r = served.post("/v1/completions", {"model": "gen_a", "input": "ab", "merged_adapters": recipe})
        assert r.status_code == 200 and r.json()["choices"][0]["adapter"].startswith("merged-"), r.text
        names.append(r.json()["choices"][0]["adapter"])
    shutil.copytree(registry / "gen_a" / "1.0.0", tmp_path / "copy")
    taken = served.post("/v1/load_lora_adapter", {"lora_name": "merged-0123456789ab", "lora_path": str(tmp_path / "copy")})
    assert taken.status_code == 400 and "per-request merges" in taken.json()["error"]["message"], taken.text
    assert served.post("/v1/load_lora_adapter", {"lora_name": "merged-late", "lora_path": str(tmp_path / "copy")}).status_code == 200
    try:
        assert served.post("/v1/completions", {"model": "merged-late", "input": "ab"}).status_code == 200
        text = httpx.get(served.url + "/metrics").text
    finally:
        served.post("/v1/unload_lora_adapter", {"lora_name": "merged-late"})
    assert not any(f'adapter="{n}"' in text for n in names) and 'adapter="merged-late"' in text
    for metric in ("adapterhub_requests_total", "adapterhub_prompt_tokens_total", "adapterhub_generated_tokens_total"):
        line = next(x for x in text.splitlines() if x.startswith(metric + "{") and 'adapter="merged"' in x)
        assert float(line.rsplit(" ", 1)[1]) >= 2, line


def test_adapters_load_and_unload_at_run_time_through_the_registry_checks(served, registry, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(registry / "gen_a" / "1.0.0", folder)
    loaded = served.post("/v1/load_lora_adapter", {"lora_name": "late", "lora_path": str(folder), "base_model_name": "x"})
    assert loaded.status_code == 200 and loaded.headers[IGNORED_HEADER] == "base_model_name"  # a field not read is named
    card = next(m.model_extra for m in served.client.models.list().data if m.id == "late")
    assert Path(card["root"]) == folder and card["parent"] == "base"  # the folder it was read from, as vLLM lists it
    # vLLM's in-place replacement of a name loaded at run time (here by the same folder; test_vllm_shapes swaps folders)
    r = served.post("/v1/load_lora_adapter", {"lora_name": "late", "lora_path": str(folder), "load_inplace": True})
    assert r.status_code == 200, r.text
    late = served.client.completions.create(model="late", prompt="", extra_body={"input": "ef"}).choices[0].text
    assert late == served.client.completions.create(model="gen_a", prompt="", extra_body={"input": "ef"}).choices[0].text
    unloaded = served.post("/v1/unload_lora_adapter", {"lora_name": "late", "lora_path": str(folder)})
    assert unloaded.status_code == 200 and unloaded.headers[IGNORED_HEADER] == "lora_path"  # unload reads the name only
    assert served.post("/v1/completions", {"model": "late", "prompt": "x"}).status_code == 404
    assert "late" not in {m.id for m in served.client.models.list().data}  # and no longer listed
    # a folder trained on another backbone is refused, naming both
    other = on_another_backbone(registry / "gen_a" / "1.0.0", tmp_path / "other")
    r = served.post("/v1/load_lora_adapter", {"lora_name": "other", "lora_path": str(other)})
    assert r.status_code == 400 and "trained on backbone badbadbadbadbad0" in r.json()["error"]["message"], r.text
    assert "other" not in {m.id for m in served.client.models.list().data}
    # a tampered registry folder is refused when loaded by its path
    tampered = registry / "cls_b" / "1.0.0" / "adapter_model.safetensors"
    saved = tampered.read_bytes()
    try:
        tampered.write_bytes(saved[:-4] + b"\0\0\0\0")
        r = served.post("/v1/load_lora_adapter", {"lora_name": "evil", "lora_path": str(tampered.parent)})
        assert r.status_code == 400 and "sha256" in r.json()["error"]["message"]
    finally:
        tampered.write_bytes(saved)


def test_runtime_loading_is_off_unless_asked(registry):
    s = Served(registry, allow_runtime_loading=False)
    try:
        r = s.post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/tmp"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "runtime_loading_off"
    finally:
        s.close()


def test_reload_picks_up_a_new_registry_version(registry, tmp_path):
    import shutil

    reg = tmp_path / "reg"
    shutil.copytree(registry, reg)
    s = Served(reg)
    try:
        before = s.client.completions.create(model="gen_a", prompt="", extra_body={"input": "gh"}).choices[0].text
        open_registry(reg).publish(reg / "gen_b" / "1.0.0", "2.0.0", name="gen_a")  # gen_a@2.0.0 has gen_b's weights
        assert s.client.completions.create(model="gen_a", prompt="", extra_body={"input": "gh"}).choices[0].text == before
        assert s.post("/v1/reload").json() == {"added": [], "updated": ["gen_a"], "deferred": [], "shadowed": [], "unavailable": {}}
        after = s.client.completions.create(model="gen_a", prompt="", extra_body={"input": "gh"}).choices[0].text
        assert after == s.client.completions.create(model="gen_b", prompt="", extra_body={"input": "gh"}).choices[0].text
    finally:
        s.close()


def start_server(reg, port, tmp):
    """`adapterhub-lite serve` as a subprocess; returns it once /health answers. Its TMPDIR is `tmp`: a server these
    tests SIGKILL cannot remove its merges' scratch folder, which would otherwise be left in the machine's /tmp."""
    cmd = [sys.executable, "-m", "adapterhub_lite.cli", "serve", "--registry", str(reg), "--port", str(port),
           "--quantization", "none", "--dtype", "fp32"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "TMPDIR": str(tmp)})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    pytest.fail(f"server did not start: {proc.stderr.read().decode()[-500:]}")


def test_a_server_killed_under_load_restarts_with_the_registry_intact(registry, tmp_path):
    import shutil

    reg = tmp_path / "reg"
    shutil.copytree(registry, reg)
    port = free_port()
    proc = start_server(reg, port, tmp_path)
    try:
        async def load():
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as h:
                return await asyncio.gather(*(h.post("/v1/completions", json={"model": "gen_a", "input": "ab", "max_tokens": 200}) for _ in range(16)),
                                            return_exceptions=True)

        runner = threading.Thread(target=lambda: asyncio.run(load()))
        runner.start()
        time.sleep(1.0)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        runner.join(60)
        proc = start_server(reg, port, tmp_path)
        # `serve` bounds a step's tokens by default (2048 on a CPU), as vLLM does: /health says what it runs under
        assert httpx.get(f"http://127.0.0.1:{port}/health").json()["budgets"]["max_num_batched_tokens"] == 2048
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": "gen_a", "input": "ab"}, timeout=30)
        assert answer.status_code == 200 and answer.json()["choices"][0]["adapter"] == "gen_a"
        assert open_registry(reg).verify() == []
        assert sorted(open_registry(reg).index()["adapters"]) == sorted(open_registry(registry).index()["adapters"])
    finally:
        proc.kill()
        proc.wait(10)


def test_a_taken_port_is_one_line_before_the_backbone_loads(registry):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "adapterhub_lite.cli", "serve", "--registry", str(registry), "--port", str(port)],
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith(f"error: cannot listen on 127.0.0.1:{port}")
    assert "Loading weights" not in out.stderr  # refused before the backbone was loaded


def test_sigterm_finishes_running_requests_and_takes_no_new_ones(registry, tmp_path):
    port = free_port()
    proc = start_server(registry, port, tmp_path)
    try:
        async def go():
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as h:
                running = asyncio.create_task(h.post("/v1/completions", json={"model": "base", "prompt": "a b", "max_tokens": 200}))
                while httpx.get(f"http://127.0.0.1:{port}/metrics").text.find("adapterhub_batch_rows_count 1.0") < 0:
                    await asyncio.sleep(0.01)  # the request is in the batch
                proc.send_signal(signal.SIGTERM)
                return await running

        answer = asyncio.run(go())
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 200  # finished, not cut
        assert proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down cleanly
        with pytest.raises(httpx.ConnectError):  # and the port no longer takes requests
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
    finally:
        proc.kill()
        proc.wait(10)


def test_served_adapters_change_the_answers(served):
    """Guards the equality tests above: they would also hold for a server that ignored adapters."""
    texts = {m: served.post("/v1/completions", {"model": m, "input": "ab"}).json()["choices"][0]["text"]
             for m in ("gen_a", "gen_b", "gen_prefix", "gen_prompt", "base")}
    assert len(set(texts.values())) >= 3, texts


def test_a_failing_batch_fails_its_requests_and_the_server_goes_on(registry, monkeypatch):
    s = Served(registry, request_timeout=15)
    try:
        real = s.router.bank.step

        def boom(*args, **kwargs):
            raise RuntimeError("simulated out of memory")

        monkeypatch.setattr(s.router.bank, "step", boom)
        failed = s.post("/v1/completions", {"model": "gen_a", "prompt": "x", "max_tokens": 5})
        assert failed.status_code == 500 and "simulated out of memory" in failed.json()["error"]["message"]
        monkeypatch.setattr(s.router.bank, "step", real)
        assert s.post("/v1/completions", {"model": "gen_a", "prompt": "x", "max_tokens": 5}).status_code == 200
        assert httpx.get(s.url + "/health").status_code == 200
    finally:
        s.close()


def test_sigterm_removes_the_merges_scratch_folder(registry, tmp_path):
    """uvicorn re-raises SIGTERM after shutting down, so no finalizer runs: the app's shutdown removes it."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    port = free_port()
    env = {**os.environ, "TMPDIR": str(scratch)}
    proc = subprocess.Popen([sys.executable, "-m", "adapterhub_lite.cli", "serve", "--registry", str(registry), "--port", str(port),
                             "--quantization", "none", "--dtype", "fp32"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        recipe = {"ids": ["gen_a", "gen_b"], "weights": [0.5, 0.5], "merge_strategy": "delta_linear"}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": "gen_a", "input": "ab", "merged_adapters": recipe}, timeout=60)
        assert r.status_code == 200, r.text
        assert [p.name for p in scratch.glob("adapterhub-router-*/merged-*")]  # the merge's folder is there while serving
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        assert not list(scratch.glob("adapterhub-router-*")), list(scratch.iterdir())
    finally:
        proc.kill()
        proc.wait(10)


def test_the_default_token_budget_follows_the_device_and_the_rows():
    """`--max-num-batched-tokens` left out: 2048 on a CPU, 8192 on a GPU, never below --max-batch-rows (a step must
    hold one decode token per row); given, it is kept."""
    from adapterhub_lite.serving.api import token_budget

    assert token_budget(None, 32, "cpu") == 2048 and token_budget(None, 32, "cuda:0") == 8192
    assert token_budget(None, 4096, "cpu") == 4096
    assert token_budget(100, 32, "cpu") == 100
