"""Requests that end before their answer is done (a client that leaves, a deadline, a reload or unload while they wait,
a merge nobody waits for any more) leave nothing behind: budgets, rows, host cache and catalogue return to their idle
values, and what is served afterwards is what a fresh server serves."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

import adapterhub_lite.serving.manager as manager
from adapterhub_lite.serving.engine import Engine
from adapterhub_lite.serving.jobs import Job, RequestTimeout
from adapterhub_lite.serving.params import SamplingParams
from adapterhub_lite.serving.router import Router
from adapterhub_lite.serving.runtime import Catalogue
from adapterhub_lite.serving.scheduler import Budgets

from .serving import KEY, Served, gauge, slowed


def _chunked(serve_registry):
    """An engine driven step by step whose long prompts run 4 positions a step (chunked prefill)."""
    router = Router.from_registry(serve_registry, quantization="none", dtype="fp32")
    return Engine(router, budgets=Budgets(max_rows=4, max_num_batched_tokens=4))


@pytest.mark.parametrize("end", ["cancelled", "timed out"])
def test_a_request_that_ends_during_its_chunked_prefill_frees_its_budgets_at_once(serve_registry, end):
    """A 40-token prompt runs in 10 pieces; its client leaves (or its deadline passes) after the first. At the next step
    it holds no row, no cache reservation and no prefill state, and the engine holds no job: it does not run its other
    9 pieces for nobody (vLLM frees an aborted request whatever its state)."""
    engine = _chunked(serve_registry)
    heard = []
    job = Job({"adapter": "gen_a", "prompt_ids": list(range(5, 45))}, lambda ev, p: heard.append((ev, p)),
              SamplingParams(max_tokens=8, ignore_eos=True))
    engine._waiting.put_nowait(job)
    for _ in range(200):  # gen_a is read on the loader thread first; then its first piece runs
        engine._serve_once()
        if job.filling is not None:
            break
    assert id(job) in engine.scheduler.prefilling and engine.scheduler.kv_reserved() > 0 and job.filling is not None
    if end == "cancelled":
        job.cancel()
    else:
        job.deadline = 0.0  # long past
    engine._serve_once()
    s = engine.scheduler
    assert not s.prefilling and not s.running and not s.waiting and s.kv_reserved() == 0
    assert not engine._jobs and not engine._rows and engine._dec is None and job.filling is None
    status = "cancelled" if end == "cancelled" else "RequestTimeout"
    assert engine.metrics.requests.labels(adapter="gen_a", status=status)._value.get() == 1
    if end == "timed out":
        assert heard[-1][0] == "error" and isinstance(heard[-1][1], RequestTimeout)
    engine._gauges()
    assert gauge(engine.metrics.running) == 0 and gauge(engine.metrics.kv_reserved) == 0



@pytest.mark.parametrize("adapter, chunked, end", [("gen_a", False, "cancelled"), ("gen_a", True, "cancelled"), ("cls_a", False, "cancelled"),
                                                   ("gen_a", False, "RequestTimeout")])
def test_a_prefill_whose_clients_all_left_stops_between_two_layers(serve_registry, adapter, chunked, end):
    """A prefill pass runs for seconds on a CPU; when every client in it leaves (a cancelled burst) it stops at the next
    layer instead of running to its end for nobody while a newcomer waits. Here the client leaves as layer 0 runs: the
    last layer never runs for it, the job leaves as cancelled, and the engine then serves a request as a fresh one does."""
    router = Router.from_registry(serve_registry, quantization="none", dtype="fp32")
    engine = Engine(router, budgets=Budgets(max_rows=4, max_num_batched_tokens=4 if chunked else None))
    layers = router.bank.decoder.layers
    request = {"adapter": adapter, **({"prompt_ids": list(range(5, 45))} if adapter == "gen_a" else {"text": "aaaa bbbb"})}
    heard = []
    job = Job(request, lambda ev, p: heard.append(ev), SamplingParams(max_tokens=4, ignore_eos=True) if adapter == "gen_a" else SamplingParams())
    last_ran = []
    def ends(*_):  # the client leaves mid-pass, or its deadline passes
        if end == "cancelled":
            job.cancel()
        else:
            job.deadline = 0.0
    leave = layers[0].register_forward_pre_hook(ends)
    count = layers[-1].register_forward_pre_hook(lambda *_: last_ran.append(1))
    try:
        engine._waiting.put_nowait(job)
        for _ in range(200):  # gen_a is read on the loader thread first; then its (first) pass runs
            engine._serve_once()
            if job.finished:
                break
    finally:
        leave.remove()
        count.remove()
    assert job.finished and not last_ran  # stopped before the last layer
    assert [ev for ev in heard if ev in ("done", "error")] == ([] if end == "cancelled" else ["error"])  # a timeout is told so
    assert engine.metrics.requests.labels(adapter=adapter, status=end)._value.get() == 1
    assert not engine._jobs and not engine._rows and engine._dec is None and engine.scheduler.kv_reserved() == 0
    assert all(not layer._forward_pre_hooks for layer in layers)  # no hook left on the decode path

    def answer(engine):
        return engine.run([{"adapter": "gen_a", "prompt": "abcdefgh", "max_new_tokens": 6}])[0]["prediction"]
    assert answer(engine) == answer(Engine(Router.from_registry(serve_registry, quantization="none", dtype="fp32")))


def test_an_adapter_read_that_a_reload_overtakes_is_not_cached_under_the_new_version(serve_registry, monkeypatch):
    """A request's adapter is read on a loader thread while a reload moves the name to another version (what
    POST /v1/reload does for an adapter no running row uses). The old version's weights, read for a request the
    reload overtook, must not land in the host cache under the name: the next load would serve them as the new
    version, silently. (gen_b@0.9.0 holds gen_a's weights, other modules than gen_b@1.0.0's.)"""
    router = Router.from_registry(serve_registry, quantization="none", dtype="fp32")
    read, started, release = manager.read_adapter, threading.Event(), threading.Event()

    def slow(name, folder):  # the read of the version the request was queued for, caught before it is cached
        out = read(name, folder)
        started.set()
        assert release.wait(10)
        return out

    router.host.pop("gen_b", None)
    monkeypatch.setattr(manager, "read_adapter", slow)
    with ThreadPoolExecutor(1) as loader:
        reading = loader.submit(router.fetch, "gen_b")
        assert started.wait(10)
        newer = router.inspect("gen_b", router.registry.path("gen_b@0.9.0"))  # as Catalogue.reload's read, then its apply:
        router.forget("gen_b")
        router.add(newer)
        release.set()
        reading.result()
    monkeypatch.setattr(manager, "read_adapter", read)
    want = read("gen_b", router.folders["gen_b"])[1]
    got = router.fetch("gen_b")[1]
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_a_request_whose_adapter_is_unloaded_while_it_is_read_gets_a_clear_404(serve_registry, monkeypatch):
    """An adapter loaded at run time is unloaded while a waiting request's read of it is queued on the loader: the read
    fails as an unknown adapter (404 model_not_found), not as a KeyError (500 internal error)."""
    from adapterhub_lite.serving.answers import as_api_error

    router = Router.from_registry(serve_registry, quantization="none", dtype="fp32")
    router.add(router.inspect("rt", router.registry.path("gen_a@1.0.0")))
    router.forget("rt")
    with pytest.raises(Exception) as caught:
        router.fetch("rt")
    assert as_api_error(caught.value).status == 404, caught.value



def test_a_merge_whose_only_requester_left_is_still_counted_and_bounded(serve_registry, monkeypatch):
    """A per-request merge's build goes on when the request that asked for it is cancelled (Ray Serve cancels a
    request whose client left; so does a server stopping). Once built it is registered, so it must be counted in
    --max-merges (and evictable) and its build forgotten; else every abandoned recipe stays served and on disk,
    outside the bound."""
    router = Router.from_registry(serve_registry, quantization="none", dtype="fp32")
    engine = Engine(router).start()
    catalogue = Catalogue(engine, max_merges=1)
    build, started, release = router.build_merge, threading.Event(), threading.Event()

    def slow(*args, **kwargs):
        started.set()
        assert release.wait(10)
        return build(*args, **kwargs)

    monkeypatch.setattr(router, "build_merge", slow)
    recipe = {"ids": ["gen_a", "gen_b"], "weights": [0.5, 0.5], "merge_strategy": "delta_linear"}

    async def go():
        asking = asyncio.ensure_future(catalogue.merged(recipe, "gen_a"))
        while not started.is_set():
            await asyncio.sleep(0.01)
        asking.cancel()  # the requester leaves while its merge is being built
        release.set()
        for _ in range(1000):  # built and registered, then its build is let go of (at most 10 s)
            if any(n.startswith("merged-") for n in router.folders) and not catalogue._pending:
                break
            await asyncio.sleep(0.01)
        first = next(n for n in router.folders if n.startswith("merged-"))
        assert list(catalogue.merges) == [first] and not catalogue._pending  # counted in --max-merges
        second = await catalogue.merged({**recipe, "weights": [0.3, 0.7]}, "gen_a")  # over the bound of 1: the idle first one goes
        return first, second

    try:
        first, second = asyncio.run(asyncio.wait_for(go(), 60))
        assert first not in router.folders and list(catalogue.merges) == [second]
    finally:
        engine.stop()



def test_a_merge_whose_registration_failed_is_built_again_when_asked_again(serve_registry, monkeypatch):
    """A merge written to its scratch folder and then refused (here: inspecting it fails once) leaves no folder behind:
    the same recipe asked again is built and served, not refused for good because the folder it writes already exists."""
    router = Router.from_registry(serve_registry, quantization="none", dtype="fp32")
    engine = Engine(router).start()
    catalogue = Catalogue(engine, max_merges=2)
    inspect, calls = router.inspect, []

    def flaky(name, folder=None):
        calls.append(name)
        if len(calls) == 1:
            raise OSError("disk read failed")
        return inspect(name, folder)

    monkeypatch.setattr(router, "inspect", flaky)
    recipe = {"ids": ["gen_a", "gen_b"], "weights": [0.5, 0.5], "merge_strategy": "delta_linear"}
    try:
        with pytest.raises(Exception, match="disk read failed"):
            asyncio.run(asyncio.wait_for(catalogue.merged(recipe, "gen_a"), 60))
        name = asyncio.run(asyncio.wait_for(catalogue.merged(recipe, "gen_a"), 60))
        assert name in router.folders and list(catalogue.merges) == [name] and len(calls) == 2
        assert not list(Path(router._scratch.name).glob(".building-*"))
    finally:
        engine.stop()


def test_a_stream_whose_client_leaves_before_its_first_byte_frees_its_rows(serve_registry, monkeypatch):
    """A streaming client that gives up while its request is still being read (each engine step slowed to 0.3 s, the
    client waits 0.1 s): its response is never started, so the stream's own clean-up never runs. Its row must still
    be dropped at once, not decoded to its 400th token (or the request timeout) for nobody."""
    s = Served(serve_registry)
    try:
        slowed(s, monkeypatch, 0.3)

        async def go():
            async with httpx.AsyncClient(base_url=s.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=0.1) as h:
                with pytest.raises(httpx.TimeoutException):
                    await h.post("/v1/completions", json={"model": "base", "prompt": "leave", "max_tokens": 400, "ignore_eos": True, "stream": True})

        asyncio.run(go())
        cancelled = s.engine.metrics.requests.labels(adapter="base", status="cancelled")
        deadline = time.monotonic() + 5
        while (cancelled._value.get() < 1 or s.engine._jobs) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cancelled._value.get() == 1 and not s.engine._jobs and not s.engine._rows, "the row decodes on for a client that left"
    finally:
        s.close()


def test_a_router_run_its_caller_interrupts_leaves_nothing_for_the_next_run(serve_registry):
    """A Ctrl-C (here raised from the caller's on_done, at the first answer) stops Router.run part-way through a step.
    Its requests must leave the engine with it: the next run on the same Router must not decode them on, call the
    old on_done again, or fail on a batch the cut step left half-updated (it raised KeyError and failed the new
    request), and answers as a fresh Router does."""
    requests = [{"adapter": a, "prompt": p, "max_new_tokens": 30} for a in ("gen_a", "gen_b", "base") for p in ("ab", "cd ef")]
    router = Router.from_registry(serve_registry, quantization="none", dtype="fp32")

    def interrupt(i):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        router.run(requests, on_done=interrupt)
    e = router._engine
    assert not e._jobs and not e._rows and e._dec is None and e._waiting.empty()
    assert len(e.scheduler) == 0 and e.scheduler.kv_reserved() == 0
    again = [{"adapter": "gen_a", "prompt": "ab", "max_new_tokens": 6}, {"adapter": "gen_prefix", "prompt": "cd", "max_new_tokens": 6}]
    heard = []
    got = router.run(again, on_done=heard.append)
    assert sorted(heard) == [0, 1] and not e._jobs and not e._rows
    assert got == Router.from_registry(serve_registry, quantization="none", dtype="fp32").run(again)


def test_a_run_time_load_whose_request_is_cancelled_as_it_lands_is_still_unloadable(serve_registry, monkeypatch):
    """POST /v1/load_lora_adapter cancelled (its client left, under Ray Serve) just as the engine thread has added the
    adapter: the adapter is served, so it must be listed as loaded at run time and unloadable; else its name is stuck
    (unload: 'no adapter was loaded at run time'; load: 'already served')."""
    router = Router.from_registry(serve_registry, quantization="none", dtype="fp32")
    engine = Engine(router).start()
    catalogue = Catalogue(engine)
    add = router.add

    async def go():
        loading = asyncio.ensure_future(catalogue.load("rt", str(router.registry.path("gen_a@1.0.0"))))
        loop = asyncio.get_running_loop()

        def added(reg):  # on the engine thread: the client leaves as the adapter lands
            add(reg)
            loop.call_soon_threadsafe(loading.cancel)
            # and the engine thread is held before it lists the load: the unload below, sent meanwhile, must still
            # find it (the listing and the unload's check both on the engine thread), not race it (1 run in ~7 failed)
            time.sleep(0.3)
        monkeypatch.setattr(router, "add", added)
        with pytest.raises(asyncio.CancelledError):
            await loading
        monkeypatch.setattr(router, "add", add)
        assert "rt" in router.folders
        await catalogue.unload("rt")  # refused with 404 ('no adapter ... was loaded at run time') before the fix
        assert "rt" not in router.folders and "rt" not in catalogue.runtime

    try:
        asyncio.run(asyncio.wait_for(go(), 60))
    finally:
        engine.stop()


def test_two_loads_of_one_name_at_once_serve_the_one_that_was_answered_200(serve_registry, monkeypatch):
    """Two POST /v1/load_lora_adapter for one new name, from different folders, at once: both passed the "already loaded"
    check before either was added (the folders are inspected off the engine thread meanwhile), so both were answered 200
    and the second add replaced the first, unsaid: the client told its folder was loaded was served the other's weights.
    One is served and answered 200; the other is vLLM's 400 for a name already loaded."""
    from adapterhub_lite.serving import protocol as P

    router = Router.from_registry(serve_registry, quantization="none", dtype="fp32")
    engine = Engine(router).start()
    catalogue = Catalogue(engine)
    inspect, both = router.inspect, threading.Barrier(2, timeout=30)

    def inspected(name, folder=None):  # each load waits here until the other has passed its checks too
        both.wait()
        return inspect(name, folder)
    monkeypatch.setattr(router, "inspect", inspected)
    folders = [str(router.registry.path(f"{a}@1.0.0")) for a in ("gen_a", "gen_b")]

    async def go():
        return await asyncio.gather(*(catalogue.load("rt", f) for f in folders), return_exceptions=True)

    try:
        got = asyncio.run(asyncio.wait_for(go(), 60))
    finally:
        engine.stop()
    served = [f for f, g in zip(folders, got) if g == "rt"]
    refused = [g for g in got if isinstance(g, P.ApiError)]
    assert len(served) == 1 and len(refused) == 1, got
    assert refused[0].status == 400 and refused[0].code == "already_loaded", refused[0]
    assert str(router.folders["rt"]) == served[0]


def test_a_reload_that_overtakes_a_run_time_load_of_its_new_name_leaves_the_loaded_adapter_served(serve_registry, tmp_path, monkeypatch):
    """A run-time load of `late` passes its checks; `late` is then published to the registry, and a reload reads it while the
    load's folder is still inspected. The load lands first (answered 200, listed as loaded at run time); the reload then
    replaced it with the registry's, unsaid, while the catalogue still listed the run-time one. Runtime and registry
    adapters keep apart names: the reload leaves it (`shadowed`) until it is unloaded."""
    import shutil

    from adapterhub_lite.artifacts.registries import open_registry

    registry = tmp_path / "registry"
    shutil.copytree(serve_registry, registry)
    router = Router.from_registry(registry, quantization="none", dtype="fp32")
    engine = Engine(router).start()
    catalogue = Catalogue(engine)
    ours, theirs = str(registry / "gen_a" / "1.0.0"), registry / "gen_b" / "1.0.0"
    inspect, reloading = router.inspect, threading.Event()

    def inspected(name, folder=None):
        if str(folder) == ours:  # the run-time load's folder: inspected once the reload has begun reading `late`
            assert reloading.wait(30)
        elif name == "late":  # the reload's read of the registry's `late`
            reloading.set()
            for _ in range(3000):  # the load lands meanwhile (listed on the engine thread with its add)
                if "late" in catalogue.runtime:
                    break
                time.sleep(0.01)
        return inspect(name, folder)
    monkeypatch.setattr(router, "inspect", inspected)

    async def go():
        loading = asyncio.ensure_future(catalogue.load("late", ours))
        await asyncio.sleep(0.2)  # past its name checks: waiting in inspect
        open_registry(registry).publish(theirs, "1.0.0", name="late")
        reloaded = await catalogue.reload()
        return await loading, reloaded

    try:
        loaded, reloaded = asyncio.run(asyncio.wait_for(go(), 60))
    finally:
        engine.stop()
    assert loaded == "late" and "late" in catalogue.runtime
    assert "late" not in reloaded["added"] and reloaded["shadowed"] == ["late"], reloaded
    assert str(router.folders["late"]) == ours


def test_an_idle_engine_holds_no_per_row_factors_of_its_last_batch(serve_registry):
    """Rows of two LoRA adapters and an IA3 one share a batch: each targeted layer gathers every row's factors (working
    memory, reported as batch_row_bytes). Once every row has left, none of it may stay held (the gauge read 90,624
    bytes on an idle tiny server; 3.7 MB a row on the default backbone)."""
    router = Router.from_registry(serve_registry, quantization="none", dtype="fp32")
    router.run([{"adapter": a, "prompt": "ab cd", "max_new_tokens": 6} for a in ("gen_a", "gen_b", "cls_ia3", "gen_a")])
    engine = router._engine
    assert not engine._rows and engine._dec is None
    assert router.bank.row_bytes() == 0 and router.memory()["batch_row_bytes"] == 0


def one_row_engine(router, **catalogue_args):
    """An engine of one row, each step slowed (a busy row's 500 steps outlast the test, however fast the machine), its
    catalogue, what each request ended with, and send(name, request, new): a job for new tokens (None: a task answer)."""
    engine = Engine(router, budgets=Budgets(max_rows=1))
    once = engine._serve_once
    engine._serve_once = lambda: time.sleep(0.01) or once()
    engine.start()
    ended = {}

    def send(name, request, new=None):
        def hear(event, payload):
            if event in ("done", "error"):
                ended[name] = (event, payload)
        job = Job(request, hear, SamplingParams(max_tokens=new, ignore_eos=True), answer_mode=new is None)
        engine.submit(job)
        return job
    return engine, Catalogue(engine, **catalogue_args), ended, send


def ids(adapter):
    """A request of three prompt ids for `adapter`."""
    return {"adapter": adapter, "prompt_ids": [5, 9, 14]}


def test_a_merge_that_queued_requests_wait_for_is_not_evicted_under_them(serve_registry):
    """--max-merges 1: a request for a built merge waits in the queue (the only row is busy) when another recipe is
    asked for. Making room must not forget the merge the queued request was accepted for (it then failed as an
    unknown adapter once admitted); the newcomer is the one told to retry (429), as when running rows hold every merge."""
    from adapterhub_lite.serving import protocol as P

    router = Router.from_registry(serve_registry, quantization="none", dtype="fp32")
    engine, catalogue, ended, send = one_row_engine(router, max_merges=1)

    recipe = {"ids": ["gen_a", "gen_b"], "weights": [0.5, 0.5], "merge_strategy": "delta_linear"}

    async def go():
        first = await catalogue.merged(recipe, "gen_a")
        busy = send("busy", ids("base"), 500)  # holds the only row
        while not engine._rows:
            await asyncio.sleep(0.01)
        send("queued", ids(first), 4)  # accepted for the merge; waits for the row
        while not engine.scheduler.waiting:
            await asyncio.sleep(0.01)
        with pytest.raises(P.ApiError) as refused:
            await catalogue.merged({**recipe, "weights": [0.3, 0.7]}, "gen_a")
        busy.cancel()
        for _ in range(1000):
            if "queued" in ended:
                break
            await asyncio.sleep(0.01)
        return first, refused.value

    try:
        first, refused = asyncio.run(asyncio.wait_for(go(), 60))
        assert ended["queued"][0] == "done", ended["queued"]
        assert refused.status == 429 and first in router.folders
    finally:
        engine.stop()


def test_a_reload_waits_for_the_requests_queued_for_the_old_version(serve_registry, tmp_path):
    """A task request for gen_b is read (template, task budget: 5 new tokens) and queued behind a busy row; then
    gen_b 2.0.0 (gen_a's weights, a 4-token task budget) is published and POST /v1/reload runs. The queued request
    must be answered by the version it was read for, not by 2.0.0's weights within 1.0.0's budget (5 tokens where
    2.0.0 makes 4): the reload defers gen_b (as for running rows) until no request holds it."""
    import shutil

    from adapterhub_lite.artifacts.registries import open_registry

    registry = tmp_path / "registry"
    shutil.copytree(serve_registry, registry)
    router = Router.from_registry(registry, quantization="none", dtype="fp32")
    engine, catalogue, ended, send = one_row_engine(router)

    async def go():
        busy = send("busy", ids("base"), 500)  # holds the only row
        while not engine._rows:
            await asyncio.sleep(0.01)
        send("queued", {"adapter": "gen_b", "text": "ab"})
        while not engine.scheduler.waiting:
            await asyncio.sleep(0.01)
        r = open_registry(registry)
        r.publish(r.path("gen_b@0.9.0"), "2.0.0", name="gen_b")
        first = await catalogue.reload()
        busy.cancel()
        for _ in range(1000):
            if "queued" in ended:
                break
            await asyncio.sleep(0.01)
        return first, await catalogue.reload()

    try:
        first, second = asyncio.run(asyncio.wait_for(go(), 60))
    finally:
        engine.stop()
    old = Router.from_registry(serve_registry, quantization="none", dtype="fp32").run([{"adapter": "gen_b", "text": "ab"}])[0]
    new = Router.from_registry(registry, quantization="none", dtype="fp32").run([{"adapter": "gen_b", "text": "ab"}])[0]
    event, result = ended["queued"]
    assert event == "done" and old != new
    assert first["deferred"] == ["gen_b"] and second["updated"] == ["gen_b"]
    assert (result.adapter, result.text) == (old["adapter"], old["prediction"])


def test_an_unload_lets_the_requests_queued_for_the_adapter_finish(serve_registry):
    """/v1/unload_lora_adapter while a request accepted for that run-time adapter waits in the queue (the only row is
    busy): the unload is answered at once, as vLLM's (it was a 409 to retry), the queued request is served on the adapter
    once admitted (not failed as an unknown adapter), and the adapter is forgotten after it."""
    router = Router.from_registry(serve_registry, quantization="none", dtype="fp32")
    engine, catalogue, ended, send = one_row_engine(router)

    async def go():
        await catalogue.load("rt", str(router.registry.path("gen_a@1.0.0")))
        busy = send("busy", ids("base"), 500)  # holds the only row
        while not engine._rows:
            await asyncio.sleep(0.01)
        send("queued", ids("rt"), 4)
        while not engine.scheduler.waiting:
            await asyncio.sleep(0.01)
        await catalogue.unload("rt")
        kept = "rt" in router.folders and "rt" in router.leaving and "rt" not in catalogue.runtime
        busy.cancel()
        for _ in range(1000):
            if "queued" in ended and "rt" not in router.folders:
                break
            await asyncio.sleep(0.01)
        return kept

    try:
        kept = asyncio.run(asyncio.wait_for(go(), 60))
    finally:
        engine.stop()
    assert kept and ended["queued"][0] == "done", ended["queued"]
    assert "rt" not in router.folders and "rt" not in router.leaving and "rt" not in router.host


def test_a_merge_whose_registering_step_fails_is_built_again_when_asked_again(serve_registry, monkeypatch):
    """The merge is built and inspected, then its registration on the engine thread fails once (as a rename in the scratch
    folder can): its folder goes too, and the same recipe asked again is built and served, not refused for good."""
    router = Router.from_registry(serve_registry, quantization="none", dtype="fp32")
    engine = Engine(router).start()
    catalogue = Catalogue(engine, max_merges=2)
    register, calls = catalogue._register_merge, []

    def flaky(r, name, folder, reg):
        calls.append(name)
        if len(calls) == 1:
            raise OSError("rename failed")
        return register(r, name, folder, reg)

    monkeypatch.setattr(catalogue, "_register_merge", flaky)
    recipe = {"ids": ["gen_a", "gen_b"], "weights": [0.5, 0.5], "merge_strategy": "delta_linear"}
    try:
        with pytest.raises(Exception, match="rename failed"):
            asyncio.run(asyncio.wait_for(catalogue.merged(recipe, "gen_a"), 60))
        assert not list(Path(router._scratch.name).glob(".building-*"))
        name = asyncio.run(asyncio.wait_for(catalogue.merged(recipe, "gen_a"), 60))
        assert name in router.folders and list(catalogue.merges) == [name] and len(calls) == 2
    finally:
        engine.stop()


def test_a_merge_whose_add_fails_after_its_rename_leaves_no_folder_and_is_built_again(serve_registry, monkeypatch):
    """Registration renames the built folder into place, then adds it: when the add fails (here once), the renamed folder
    went unremoved (only the `.building-` one was), a merged adapter on disk outside the catalogue and --max-merges. Now the
    failure leaves nothing in the scratch folder, and the same recipe asked again is built and served."""
    router = Router.from_registry(serve_registry, quantization="none", dtype="fp32")
    engine = Engine(router).start()
    catalogue = Catalogue(engine, max_merges=2)
    add, calls = router.add, []

    def flaky(reg):
        if reg.name.startswith("merged-"):
            calls.append(reg.name)
            if len(calls) == 1:
                raise OSError("add failed")
        return add(reg)

    monkeypatch.setattr(router, "add", flaky)
    recipe = {"ids": ["gen_a", "gen_b"], "weights": [0.5, 0.5], "merge_strategy": "delta_linear"}
    scratch = Path(router._scratch.name)
    try:
        with pytest.raises(Exception, match="add failed"):
            asyncio.run(asyncio.wait_for(catalogue.merged(recipe, "gen_a"), 60))
        assert not list(scratch.iterdir()) and calls[0] not in router.folders and not catalogue.merges
        name = asyncio.run(asyncio.wait_for(catalogue.merged(recipe, "gen_a"), 60))
        assert name == calls[0] and name in router.folders and list(catalogue.merges) == [name] and len(calls) == 2
        assert [p.name for p in scratch.iterdir()] == [name]
    finally:
        engine.stop()


def test_the_gauges_read_idle_as_the_last_answer_goes_out(serve_registry):
    """The running and KV gauges were set before the decode step, so the step that ended the last row left them at 1 row
    and its reservation until the next step (up to the idle wait): a scrape right after the answer read a busy server."""
    router = Router.from_registry(serve_registry, quantization="none", dtype="fp32")
    engine = Engine(router, budgets=Budgets(max_rows=4))
    heard = []
    job = Job({"adapter": "base", "prompt_ids": [5, 9, 14]}, lambda ev, p: heard.append(ev), SamplingParams(max_tokens=3, ignore_eos=True))
    engine._waiting.put_nowait(job)
    for _ in range(50):
        engine._serve_once()
        if "done" in heard:
            break
    assert "done" in heard
    assert gauge(engine.metrics.running) == 0 and gauge(engine.metrics.kv_reserved) == 0


def test_a_stream_whose_client_leaves_during_its_prefill_stops_it_at_the_next_layer(serve_registry):
    """After its headers (the request read) and before its first token a stream's prompt is being prefilled, here in 13
    pieces of 16 tokens; its client leaves then. Nothing is sent meanwhile, so only a listener on the connection can see it
    (Starlette's, for uvicorn's ASGI 2.3; at 2.4 it no longer listens): the job is cancelled while layer 0 of its first
    piece is held, and no piece runs after it. A guard (passes): had nobody listened, all 13 pieces would run for nobody."""
    s = Served(serve_registry, budgets=Budgets(max_rows=4, max_num_batched_tokens=16))
    layer0, release, calls = s.router.bank.decoder.layers[0], threading.Event(), []

    def hold(*_):
        calls.append(release.is_set())
        release.wait(30)  # the first piece waits here until the client has gone and the server has seen it

    hook = layer0.register_forward_pre_hook(hold)
    try:
        with httpx.stream("POST", s.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                          json={"model": "base", "prompt": list(range(5, 205)), "max_tokens": 8, "stream": True}) as r:
            assert r.status_code == 200
            deadline = time.monotonic() + 30
            while not calls and time.monotonic() < deadline:  # the prefill has begun
                time.sleep(0.01)
        deadline = time.monotonic() + 30
        while not all(j.cancelled for j in list(s.engine._jobs.values())) and time.monotonic() < deadline:
            time.sleep(0.01)
        seen = list(s.engine._jobs.values())
        release.set()
        assert seen and all(j.cancelled for j in seen), "the client's leaving was not seen while its prompt was prefilled"
        cancelled = s.engine.metrics.requests.labels(adapter="base", status="cancelled")
        while (s.engine._jobs or cancelled._value.get() < 1) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cancelled._value.get() == 1 and not s.engine._jobs and not s.engine._rows
        assert calls == [False], calls  # the held piece stopped at the next layer; no other piece ran
    finally:
        release.set()
        hook.remove()
        s.close()
