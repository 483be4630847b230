"""vLLM's /v1/unload_lora_adapter while requests use the adapter: answered 200 at once, the name gone for new requests, the
requests already accepted (running and queued) finishing on the weights they started with, the adapter's memory freed when
the last of them ends. vLLM's unload_lora_adapter drops the name from its list and calls the engine's remove_lora; requests it
had accepted keep their LoRARequest and run to their end. Here an unload under them was a 409 (in_use), retried for ever by a
client whose requests never stop."""

import asyncio
import time

import httpx

from .serving import KEY, slowed


def _until(check, seconds=60):
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "not reached"
        time.sleep(0.02)


def test_an_unload_under_a_stream_answers_200_and_the_stream_ends_on_the_old_weights(served, serve_registry, monkeypatch):
    folder = str(serve_registry / "gen_a" / "1.0.0")
    body = {"model": "gen_a", "prompt": "ab", "max_tokens": 30, "temperature": 0, "ignore_eos": True}
    want = served.post("/v1/completions", body).json()["choices"][0]["text"]
    r = served.post("/v1/load_lora_adapter", {"lora_name": "leaving", "lora_path": folder})
    assert r.status_code == 200, r.text
    slowed(served, monkeypatch)
    stream = served.client.completions.create(model="leaving", prompt="ab", max_tokens=30, temperature=0, stream=True,
                                              extra_body={"ignore_eos": True})
    chunks = iter(stream)
    text = next(chunks).choices[0].text
    r = served.post("/v1/unload_lora_adapter", {"lora_name": "leaving"})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'leaving' removed successfully.", r.text
    # gone for every new request while the stream drains
    gone = served.post("/v1/completions", {**body, "model": "leaving"})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found", gone.text
    assert "unloaded" in gone.json()["error"]["message"]
    assert "leaving" not in [m.id for m in served.client.models.list().data]
    merge = {**body, "merged_adapters": {"ids": ["leaving", "gen_b"], "weights": [0.5, 0.5]}}
    assert served.post("/v1/completions", merge).status_code == 404
    again = served.post("/v1/unload_lora_adapter", {"lora_name": "leaving"})
    assert again.status_code == 404, again.text
    busy = served.post("/v1/load_lora_adapter", {"lora_name": "leaving", "lora_path": folder})
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "draining", busy.text
    assert busy.headers.get("retry-after") == "1"
    assert "leaving" in served.router.folders  # still held for the stream
    text += "".join(c.choices[0].text for c in chunks)
    assert text == want  # to its end, on the weights it started with
    # freed once its last request ended: the catalogue, the slot and the host copy
    _until(lambda: "leaving" not in served.router.folders)
    assert "leaving" not in served.router.resident and "leaving" not in served.router.host
    health = httpx.get(served.url + "/health", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert health["memory"]["resident_adapters"] == len(served.router.resident)
    r = served.post("/v1/load_lora_adapter", {"lora_name": "leaving", "lora_path": folder})  # the name is free again
    assert r.status_code == 200, r.text
    assert served.post("/v1/unload_lora_adapter", {"lora_name": "leaving"}).status_code == 200
    assert "leaving" not in served.router.folders  # nobody used it: freed at once


def test_load_unload_churn_beside_streams_gives_no_500_and_no_mixed_weights(served, serve_registry):
    """Clients stream through a run-time adapter loaded under one name from gen_a's and gen_b's folders in turn while a
    loop unloads and loads it again: every answer is either a 404 (the name was gone when it came) or one adapter's whole
    answer, never a 500, never a mix; every unload is a 200 (no 409 to retry)."""
    folders = {a: str(serve_registry / a / "1.0.0") for a in ("gen_a", "gen_b")}
    body = {"prompt": "ab", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    want = {served.post("/v1/completions", {**body, "model": a}).json()["choices"][0]["text"] for a in folders}
    assert len(want) == 2
    seen, unloads, loads = [], [], []

    async def client(h, until):
        while time.monotonic() < until:
            r = await h.post("/v1/completions", json={**body, "model": "churn"})
            seen.append((r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else r.json()["error"]["code"]))

    async def churn(h, until):
        i = 0
        while time.monotonic() < until:
            r = await h.post("/v1/load_lora_adapter", json={"lora_name": "churn", "lora_path": folders[("gen_a", "gen_b")[i % 2]]})
            loads.append(r.status_code)
            if r.status_code == 409:  # the old one still drains
                await asyncio.sleep(0.05)
                continue
            i += 1
            await asyncio.sleep(0.1)
            unloads.append((await h.post("/v1/unload_lora_adapter", json={"lora_name": "churn"})).status_code)

    async def go():
        async with httpx.AsyncClient(base_url=served.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as h:
            until = time.monotonic() + 5
            await asyncio.gather(churn(h, until), *(client(h, until) for _ in range(3)))

    asyncio.run(go())
    assert unloads and set(unloads) == {200}, unloads
    assert set(loads) <= {200, 409}, loads
    answered = [t for code, t in seen if code == 200]
    assert answered and set(answered) <= want, set(answered) - want
    assert {t for code, t in seen if code != 200} <= {"model_not_found"}, seen
    _until(lambda: "churn" not in served.router.folders)


def test_a_reload_while_an_unloaded_adapter_drains_defers_the_registrys_version_of_its_name(serve_registry, tmp_path):
    """`late` is loaded at run time, a request for it waits in the queue (the only row is busy), and it is unloaded: it
    drains. `late` is then published to the registry and the server reloads: the registry's version is deferred (the
    draining one still answers the queued request, on its own weights) and added by a reload after the drain."""
    import shutil

    from adapterhub_lite.artifacts.registries import open_registry
    from adapterhub_lite.serving.router import Router

    from .test_serve_abort import ids, one_row_engine  # its one-row engine: a request waits in the queue

    registry = tmp_path / "registry"
    shutil.copytree(serve_registry, registry)
    router = Router.from_registry(registry, quantization="none", dtype="fp32")
    engine, catalogue, ended, send = one_row_engine(router)
    ours = str(registry / "gen_a" / "1.0.0")

    async def go():
        await catalogue.load("late", ours)
        busy = send("busy", ids("base"), 500)  # holds the only row
        while not engine._rows:
            await asyncio.sleep(0.01)
        send("queued", ids("late"), 4)
        while not engine.scheduler.waiting:
            await asyncio.sleep(0.01)
        await catalogue.unload("late")
        open_registry(registry).publish(registry / "gen_b" / "1.0.0", "1.0.0", name="late")
        first = await catalogue.reload()
        held = str(router.folders["late"])
        busy.cancel()
        while "queued" not in ended or "late" in router.leaving:
            await asyncio.sleep(0.01)
        return first, held, await catalogue.reload()

    try:
        first, held, second = asyncio.run(asyncio.wait_for(go(), 60))
    finally:
        engine.stop()
    assert first["deferred"] == ["late"] and held == ours, first
    assert ended["queued"][0] == "done" and ended["queued"][1].adapter == "late"
    assert second["added"] == ["late"] and str(router.folders["late"]) == str(registry / "late" / "1.0.0"), second


def test_auto_never_picks_an_adapter_that_drains(served, serve_registry, monkeypatch):
    """`auto` fits its content router over the adapters served; one unloaded while a stream uses it stays in the catalogue
    for that stream alone, so the router refitted then must leave it out (else `auto` sent new requests to it)."""
    r = served.post("/v1/load_lora_adapter", {"lora_name": "twin", "lora_path": str(serve_registry / "gen_a" / "1.0.0")})
    assert r.status_code == 200, r.text
    assert "twin" in served.router._fit_content_router().names  # a routing target while loaded
    slowed(served, monkeypatch)
    stream = iter(served.client.completions.create(model="twin", prompt="ab", max_tokens=30, temperature=0, stream=True,
                                                   extra_body={"ignore_eos": True}))
    next(stream)
    assert served.post("/v1/unload_lora_adapter", {"lora_name": "twin"}).status_code == 200
    assert "twin" in served.router.folders  # still held for the stream
    assert served.router._content is None or "twin" not in served.router._content.names
    assert "twin" not in served.router._fit_content_router().names
    for _ in stream:
        pass
    _until(lambda: "twin" not in served.router.folders)
