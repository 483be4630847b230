"""The engine under budgets and failures, on the tiny model: long prompts in pieces decode exactly as whole ones,
requests over the cache budget wait and all succeed, a failing prefill is retried in halves so only the row that
causes it fails, a damaged registry adapter is listed as unavailable while the rest are served, and the memory the
padded stacks take is counted."""

import concurrent.futures as cf
import shutil

import httpx
import pytest
import torch

from adapterhub_lite.core.errors import AdapterHubError
from adapterhub_lite.serving.router import Router
from adapterhub_lite.serving.scheduler import Budgets

from .serving import Served

PROMPTS = ["ab cd ef gh ab cd ef gh ab", "x", "ef gh ab cd ef gh ab cd ef gh ab cd ef", "cd ef", "gh ab cd ef gh"]
MODELS = ["gen_a", "gen_prompt", "gen_prefix", "base", "gen_b"]


def complete(s, model, prompt, max_tokens=6):
    r = s.post("/v1/completions", {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    return r.status_code, r.json()


def answers(s, jobs, threads=8):
    with cf.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda mp: complete(s, *mp), jobs))


@pytest.fixture(scope="module")
def reference(serve_registry):
    """Each (model, prompt)'s greedy completion with no budget at all."""
    s = Served(serve_registry)
    try:
        return {(m, p): complete(s, m, p)[1]["choices"][0]["text"] for m in MODELS for p in PROMPTS}
    finally:
        s.close()


def test_long_prompts_run_in_pieces_and_decode_exactly_as_whole_ones(serve_registry, reference):
    s = Served(serve_registry, budgets=Budgets(max_rows=4, max_num_batched_tokens=4))  # every prompt above 3 tokens runs in pieces
    try:
        jobs = [(m, p) for m in MODELS for p in PROMPTS]
        got = answers(s, jobs)
        assert all(code == 200 for code, _ in got)
        assert {j: body["choices"][0]["text"] for j, (_, body) in zip(jobs, got)} == reference
        assert s.engine.metrics.waits.labels(budget="tokens")._value.get() > 0  # the budget bit
    finally:
        s.close()


def test_requests_over_the_kv_budget_wait_and_all_succeed(serve_registry, reference):
    jobs = [(m, p) for m in MODELS for p in PROMPTS] * 2
    s = Served(serve_registry, budgets=Budgets(max_rows=16, max_kv_tokens=60))  # ~3 rows of the 20 asked at once
    try:
        got = answers(s, jobs, threads=16)
        assert [code for code, _ in got] == [200] * len(jobs)
        assert [b["choices"][0]["text"] for _, b in got] == [reference[j] for j in jobs]
        assert s.engine.metrics.waits.labels(budget="kv_cache")._value.get() > 0
        code, body = complete(s, "gen_a", "ab " * 30, max_tokens=40)  # could never fit: refused at once, with the numbers
        assert code == 400 and "cache positions" in body["error"]["message"] and "60" in body["error"]["message"]
    finally:
        s.close()


def test_a_failing_prefill_is_retried_in_halves_and_fails_only_its_own_row(serve_registry, reference, monkeypatch):
    s = Served(serve_registry)
    start = s.router.bank.start
    calls = []

    def flaky(input_ids, adapters, **kw):
        calls.append(len(input_ids))
        if len(input_ids) > 1:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory in prefill")  # any batch of two or more
        if adapters == ["gen_b"] and len(input_ids[0]) < 3:
            raise RuntimeError("simulated: this row breaks the kernel")
        return start(input_ids, adapters, **kw)

    try:
        monkeypatch.setattr(s.router.bank, "start", flaky)
        jobs = [(m, p) for m in MODELS for p in PROMPTS]
        got = answers(s, jobs, threads=25)
        bad = [j for j in jobs if j[0] == "gen_b" and len(s.router.backbone.tokenizer(j[1]).input_ids) < 3]
        assert bad and max(calls) > 1  # batches did form, and failed
        for job, (code, body) in zip(jobs, got):
            if job in bad:
                assert code == 500 and "this row breaks the kernel" in body["error"]["message"]
            else:
                assert code == 200 and body["choices"][0]["text"] == reference[job]
    finally:
        s.close()


def test_an_adapter_that_fails_to_load_fails_its_own_requests_only(serve_registry, reference, monkeypatch, caplog):
    """Issue 21: an adapter whose copy into its slot fails at admission (a damaged file read late, a device error) fails
    its own requests with the reason, logged with its stack; the requests beside it in the batch are answered."""
    s = Served(serve_registry)
    hold = s.router.hold

    def failing(names, **kw):
        if "gen_b" in names:
            raise RuntimeError("simulated: copying gen_b into its slot failed")
        return hold(names, **kw)

    try:
        monkeypatch.setattr(s.router, "hold", failing)
        jobs = [(m, p) for m in MODELS for p in PROMPTS]
        with caplog.at_level("ERROR", logger="adapterhub_lite.serve"):
            got = answers(s, jobs, threads=25)
        for job, (code, body) in zip(jobs, got):
            if job[0] == "gen_b":
                assert code == 500 and "copying gen_b into its slot failed" in body["error"]["message"]
            else:
                assert code == 200 and body["choices"][0]["text"] == reference[job], job
        logged = [r for r in caplog.records if "loading adapter 'gen_b' failed" in r.getMessage()]
        assert logged and logged[0].exc_info is not None  # with its stack
    finally:
        s.close()


def test_the_serve_flags_become_the_budgets_the_engine_schedules_by(serve_registry):
    """`serve`'s budget flags reach the scheduler the engine runs (the scheduler's own tests build Budgets directly)."""
    from adapterhub_lite.cli.main import build_parser
    from adapterhub_lite.serving.api import build_app

    args = build_parser().parse_args(["serve", "--registry", str(serve_registry), "--quantization", "none", "--dtype", "fp32",
                                      "--max-batch-rows", "4", "--max-num-batched-tokens", "64", "--kv-cache-mb", "0.05",
                                      "--max-loras", "2", "--max-lora-rank", "16"])
    _, engine, _ = build_app(args)
    per_token = engine.router.bank.kv_bytes_per_token()
    want = Budgets(max_rows=4, max_num_batched_tokens=64, max_kv_tokens=int(0.05 * 2**20 // per_token), max_loras=2)
    assert want.max_kv_tokens > 0 and engine.scheduler.budgets == want


def flip(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def damaged(serve_registry, tmp_path):
    reg = tmp_path / "registry"
    shutil.copytree(serve_registry, reg)
    weights = reg / "gen_b" / "1.0.0" / "adapter_model.safetensors"
    flip(weights)  # one version's weights no longer match their sha256
    return reg


def test_a_damaged_adapter_is_listed_unavailable_and_the_rest_are_served(damaged, reference):
    with pytest.warns(UserWarning, match="gen_b.*unavailable.*integrity check failed"):
        s = Served(damaged)
    try:
        health = httpx.get(s.url + "/health").json()
        assert "integrity check failed for gen_b@1.0.0" in health["unavailable_adapters"]["gen_b"]
        models = {m.id: m for m in s.client.models.list().data}
        assert models["gen_b"].available is False and "integrity" in models["gen_b"].unavailable_reason
        assert not hasattr(models["gen_a"], "available") or models["gen_a"].available is not False
        code, body = complete(s, "gen_b", "ab")
        assert code == 503 and body["error"]["code"] == "adapter_unavailable" and "integrity check failed" in body["error"]["message"]
        assert complete(s, "gen_a", PROMPTS[0])[1]["choices"][0]["text"] == reference[("gen_a", PROMPTS[0])]
    finally:
        s.close()


def test_a_registry_with_no_servable_adapter_is_still_refused(damaged):
    for name in ("cls_a", "cls_b", "cls_prefix", "cls_prompt", "cls_ia3", "gen_a", "gen_prefix", "gen_prompt"):
        w = damaged / name / "1.0.0" / "adapter_model.safetensors"
        flip(w)
    with pytest.warns(UserWarning), pytest.raises(AdapterHubError, match="no adapter of registry .* can be served"):
        Router.from_registry(damaged, quantization="none", dtype="fp32")


def test_memory_counts_the_slot_pools_the_layers_keep(serve_registry):
    router = Router.from_registry(serve_registry, quantization="none", dtype="fp32")
    router.run([{"adapter": a, "prompt": "ab"} for a in ("gen_a", "gen_b", "cls_a", "cls_ia3")])  # syncs every layer's pool
    built = 0
    for layer in router.bank._lora.values():
        for t in (*(layer._pool or ()), *(layer._scale_all[1][:2] if layer._scale_all else ())):
            if isinstance(t, torch.Tensor):
                built += t.numel() * t.element_size()
    assert built > 0 and router.bank.stack_bytes() == built
    mem = router.memory()
    assert mem["stack_bytes"] == built and mem["total_bytes"] == mem["adapter_bytes"] + built
    assert router.resident_bytes() == mem["total_bytes"]


def test_loading_an_adapter_copies_into_its_slot_and_leaving_zeroes_it(serve_registry):
    """The pool is updated in place: a load writes its own slot (the other slots' memory is not rebuilt), and a slot
    reused by an adapter that does not target a layer holds zeros there, not the factors of the one before."""
    router = Router.from_registry(serve_registry, quantization="none", dtype="fp32")
    prompt = [{"adapter": "gen_b", "prompt": "ab cd", "max_new_tokens": 3}]
    alone = router.run(prompt)
    router.hold(["gen_a"])
    router.run([{"adapter": "gen_a", "prompt": "ab"}])
    q = next(layer for name, layer in router.bank._lora.items() if name.endswith("layers.0.self_attn.q_proj"))
    before = q._pool[0].data_ptr()
    router.hold(["gen_b"])
    router.run(prompt)
    assert q._pool[0].data_ptr() == before  # the same storage: gen_b was copied into its slot
    slot_a = router.bank._adapters["gen_a"].slot
    router.unload("gen_a")
    router.hold(["gen_prefix", "cls_b"])  # cls_b (k_proj, o_proj) takes gen_a's slot; it does not target q_proj
    assert router.bank._adapters["cls_b"].slot == slot_a
    router.run([{"adapter": "cls_b", "prompt": "ab"}])
    assert not q._pool[0][slot_a].any() and not q._pool[1][slot_a].any()
    assert router.run(prompt) == alone


def test_the_router_api_is_safe_from_several_threads(serve_registry):
    """Each thread's batch runs under its own adapters: without the router's lock their slot assignments (one per
    model, RowContext) and residency changes interleave and rows come back through another thread's adapters."""
    router = Router.from_registry(serve_registry, quantization="none", dtype="fp32", memory_budget_mb=1e-3)  # every batch evicts
    batches = [[{"adapter": a, "prompt": p, "max_new_tokens": 4} for p in PROMPTS] for a in ("gen_a", "gen_b", "gen_prompt", "base")]
    want = [router.run(b) for b in batches]
    with cf.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: [router.run(batches[i % 4]) for _ in range(3)], range(8)))
    assert all(runs == [want[i % 4]] * 3 for i, runs in enumerate(got))


def test_a_cold_adapter_is_read_off_the_engine_thread_and_holds_nobody_up(serve_registry, reference):
    """gen_b's read blocks until a gen_a request has been answered: if reading ran on the engine thread (or the
    queue waited for it) the gen_a request could not be answered first."""
    import threading

    s = Served(serve_registry)
    released, order = threading.Event(), []
    fetch = s.router.fetch

    def slow_fetch(name):
        if name == "gen_b" and name not in s.router.host:
            order.append("gen_b read starts")
            released.wait(60)
            order.append("gen_b read ends")
        return fetch(name)

    try:
        s.router.fetch = slow_fetch
        with cf.ThreadPoolExecutor(2) as pool:
            cold = pool.submit(complete, s, "gen_b", PROMPTS[0])
            while not order:
                released.wait(0.01)
            warm = complete(s, "gen_a", PROMPTS[0])
            order.append("gen_a answered")
            released.set()
            assert warm[1]["choices"][0]["text"] == reference[("gen_a", PROMPTS[0])]
            assert cold.result()[1]["choices"][0]["text"] == reference[("gen_b", PROMPTS[0])]
        assert order == ["gen_b read starts", "gen_a answered", "gen_b read ends"]
    finally:
        released.set()
        s.close()


def test_the_host_cache_keeps_read_adapters_within_max_cpu_loras(serve_registry, monkeypatch):
    from adapterhub_lite.serving import manager as manager_module

    reads = []
    read = manager_module.read_adapter
    monkeypatch.setattr(manager_module, "read_adapter", lambda name, folder: reads.append(name) or read(name, folder))
    router = Router.from_registry(serve_registry, quantization="none", dtype="fp32", max_cpu_loras=2)
    for name in ("gen_a", "gen_b", "gen_a", "gen_prefix", "gen_a"):
        router.hold([name])
        router.unload(name)  # off the device: the next use comes from host memory while it is cached
    assert reads == ["gen_a", "gen_b", "gen_prefix"]  # gen_a was read once
    assert list(router.host) == ["gen_prefix", "gen_a"] and router.memory()["host_cached_adapters"] == 2
    assert router.memory()["host_bytes"] == sum(t.numel() * t.element_size() for _, w in router.host.values() for t in w.values())


def test_a_fixed_slot_rank_refuses_wider_adapters_and_serves_the_rest(serve_registry):
    router = Router.from_registry(serve_registry, quantization="none", dtype="fp32", max_lora_rank=8)
    with pytest.raises(AdapterHubError, match="gen_b' has rank 16 but this server's adapter slots hold rank 8 at most"):
        router.hold(["gen_b"])
    router.run([{"adapter": "gen_a", "prompt": "ab"}])
    q = next(layer for name, layer in router.bank._lora.items() if name.endswith("q_proj"))
    assert q._pool[0].shape[2] == 8 and q.pool_rank == 8


def test_max_loras_preallocates_the_slot_pools_and_evicts_to_stay_within_them(serve_registry, reference):
    """vLLM's preallocated slots: with --max-loras 2 and --max-lora-rank 16 every targeted layer's pool is 3 slots (the
    plain backbone's and two) × rank 16 from the first load on; a third LoRA / IA3 adapter evicts the least recently
    used, and the answers are those of the unbounded server."""
    router = Router.from_registry(serve_registry, quantization="none", dtype="fp32", max_lora_rank=16, max_loras=2)
    for name in ("gen_a", "cls_ia3", "gen_b", "cls_a", "gen_a", "cls_b", "gen_b"):
        router.run([{"adapter": name, "prompt": "ab"}])
        assert router.bank.slots_held() <= 2
        for layer in router.bank._lora.values():
            if layer._pool is not None:
                assert (layer._pool[0].shape[0], layer._pool[0].shape[2]) == (3, 16)
        assert all(n in router.resident for n in router.bank.names())
    assert router.evictions >= 5
    s = Served(serve_registry, budgets=Budgets(max_rows=8, max_loras=2), max_loras=2, max_lora_rank=16)
    try:
        jobs = [(m, p) for p in PROMPTS for m in MODELS]
        got = answers(s, jobs)
        assert all(code == 200 for code, _ in got)
        assert [body["choices"][0]["text"] for _, body in got] == [reference[j] for j in jobs]
        assert s.router.bank.slots_held() <= 2
    finally:
        s.close()


def test_an_adapter_dropped_from_host_memory_while_its_request_waits_is_read_again_off_the_engine_thread(serve_registry, monkeypatch):
    """With --max-cpu-loras 1, gen_a's and gen_b's requests wait behind a running row (one row at a time) while both are
    read on loader threads; the second read drops the first from host memory. Admitting that request read its
    adapter's files (and hashed them) on the engine thread, every running row stalled meanwhile; it is now read
    again on a loader thread while it waits, and every answer is the one a large host cache gives."""
    import threading

    from adapterhub_lite.serving import manager as manager_module
    from adapterhub_lite.serving.engine import Engine
    from adapterhub_lite.serving.jobs import Job
    from adapterhub_lite.serving.params import SamplingParams

    reads, read = [], manager_module.read_adapter
    monkeypatch.setattr(manager_module, "read_adapter", lambda name, folder: reads.append((name, threading.current_thread().name)) or read(name, folder))

    def serve(max_cpu_loras):
        engine = Engine(Router.from_registry(serve_registry, quantization="none", dtype="fp32", max_cpu_loras=max_cpu_loras),
                        budgets=Budgets(max_rows=1))
        done = {}
        for i, (adapter, n) in enumerate([("base", 12), ("gen_a", 4), ("gen_b", 4)]):
            engine._waiting.put_nowait(Job({"adapter": adapter, "prompt_ids": [5, 9, 14]}, lambda event, payload, i=i: done.setdefault(i, payload)
                                           if event in ("done", "error") else None, SamplingParams(max_tokens=n, ignore_eos=True)))
        engine._serve_once()  # the base row runs; both adapters are being read
        for fut in list(engine._fetching.values()):
            fut.result()
        assert len(engine.router.host) == min(2, max_cpu_loras)
        while len(done) < 3:
            engine._serve_once()
        return [getattr(done[i], "token_ids", done[i]) for i in range(3)]

    want = serve(64)
    reads.clear()
    assert serve(1) == want
    assert {name for name, _ in reads} == {"gen_a", "gen_b"} and all(t.startswith("adapterhub-loader") for _, t in reads), reads


def test_registry_io_runs_off_the_engine_thread_and_the_event_loop(serve_registry, tmp_path):
    """Reloads, runtime loads and pinned versions read and hash their folders on worker threads: decoding and
    the HTTP server go on meanwhile."""
    import threading

    reg = tmp_path / "registry"
    shutil.copytree(serve_registry, reg)
    s = Served(reg)
    threads = []
    inspect = s.router.inspect

    def recording(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return inspect(*args, **kwargs)

    try:
        s.router.inspect = recording
        s.router.registry.publish(reg / "gen_a" / "1.0.0", "2.0.0", name="gen_a")  # a new version to pick up
        assert s.post("/v1/reload").json()["updated"] == ["gen_a"]
        assert s.post("/v1/load_lora_adapter", {"lora_name": "rt", "lora_path": str(reg / "gen_b" / "1.0.0")}).status_code == 200
        assert complete(s, "gen_b@0.9.0", "ab")[0] == 200
        # worker threads of the event loop (asyncio_N, or uvloop_N where uvloop is installed): neither the loop's own thread
        # (the uvicorn thread here) nor the engine's
        assert len(threads) == 3 and not {s.thread.name, s.engine._thread.name} & set(threads), threads
    finally:
        s.close()


def test_requests_wait_for_adapter_memory_and_the_budget_holds(serve_registry, reference):
    probe = Router.from_registry(serve_registry, quantization="none", dtype="fp32")
    probe.hold(["gen_b"])
    budget = probe.resident_bytes() * 1.2  # the largest of the three alone, not two of them
    s = Served(serve_registry, memory_budget_mb=budget / 2**20)
    peak = []
    step = s.engine._step

    def watched():
        peak.append(s.router.resident_bytes())
        step()

    try:
        s.engine._step = watched
        jobs = [(m, p) for m in ("gen_a", "gen_b", "gen_prompt") for p in PROMPTS]
        got = answers(s, jobs, threads=15)
        assert [code for code, _ in got] == [200] * len(jobs)
        assert [b["choices"][0]["text"] for _, b in got] == [reference[j] for j in jobs]
        assert max(peak) <= budget  # never over: a request whose adapter does not fit waits for the running rows
        assert s.engine.metrics.waits.labels(budget="memory")._value.get() > 0
    finally:
        s.close()


def test_a_request_waiting_for_adapter_memory_is_not_passed_by_later_ones(serve_registry):
    """First come, first served behind a request whose adapter waits for memory: a later request whose adapter is
    already resident (it could start at once) waits behind it, so the waiting one is never starved by a stream of them."""
    from adapterhub_lite.serving.engine import Engine
    from adapterhub_lite.serving.jobs import Job
    from adapterhub_lite.serving.params import SamplingParams

    probe = Router.from_registry(serve_registry, quantization="none", dtype="fp32")
    probe.hold(["gen_b"])
    router = Router.from_registry(serve_registry, quantization="none", dtype="fp32",
                                  memory_budget_mb=probe.resident_bytes() * 1.2 / 2**20)  # one adapter at a time
    for name in ("gen_a", "gen_b"):  # in host memory: no request here waits for a read (which lets later ones pass it)
        router.fetch(name)
    engine = Engine(router, budgets=Budgets(max_rows=4))
    done, jobs = [], {}

    def send(name, adapter, new):
        def hear(event, payload):
            if event in ("done", "error"):
                done.append((name, event))
        jobs[name] = Job({"adapter": adapter, "prompt_ids": [5, 9, 14]}, hear, SamplingParams(max_tokens=new, ignore_eos=True))
        engine._waiting.put_nowait(jobs[name])

    send("first", "gen_a", 8)
    engine._serve_once()  # gen_a resident, its row running
    send("waits", "gen_b", 2)  # gen_b does not fit beside gen_a, which the running row holds
    send("later", "gen_a", 2)  # gen_a is resident: it could start now, ahead of the one that came before it
    while len(done) < 3:
        engine._serve_once()
    assert done == [("first", "done"), ("waits", "done"), ("later", "done")], done
    assert jobs["waits"].times.scheduled < jobs["later"].times.scheduled
    assert engine.metrics.waits.labels(budget="memory")._value.get() > 0


def test_a_request_waiting_for_adapter_memory_does_not_load_its_adapter_at_every_step(serve_registry, monkeypatch):
    """gen_b does not fit beside gen_a, which a 30-token row holds: its request waits at the head. Each step tried it
    again: gen_b copied to the device (and its modules wrapped), over the budget, unloaded, 30 times, and each try
    changed the slot table, which drops every captured CUDA graph of the running rows. It is tried once while the set
    of resident adapters the batch holds stays the same, and answered as before once gen_a's row has left."""
    from adapterhub_lite.serving.engine import Engine
    from adapterhub_lite.serving.jobs import Job
    from adapterhub_lite.serving.params import SamplingParams

    probe = Router.from_registry(serve_registry, quantization="none", dtype="fp32")
    probe.hold(["gen_b"])
    router = Router.from_registry(serve_registry, quantization="none", dtype="fp32",
                                  memory_budget_mb=probe.resident_bytes() * 1.2 / 2**20)  # one adapter at a time
    for name in ("gen_a", "gen_b"):  # in host memory: neither request waits for a read (which would let gen_b go first)
        router.fetch(name)
    engine = Engine(router, budgets=Budgets(max_rows=4))
    tries, add, done = [], router.bank.add, {}

    def adding(name, *args, **kwargs):
        if name == "gen_b" and 0 not in done:  # gen_a's row still runs
            tries.append(len(engine._rows))
        return add(name, *args, **kwargs)
    monkeypatch.setattr(router.bank, "add", adding)
    for i, (adapter, new) in enumerate([("gen_a", 30), ("gen_b", 3)]):
        engine._waiting.put_nowait(Job({"adapter": adapter, "prompt_ids": [5, 9, 14]}, lambda event, payload, i=i: done.setdefault(i, payload)
                                       if event in ("done", "error") else None, SamplingParams(max_tokens=new, ignore_eos=True)))
    while len(done) < 2:
        engine._serve_once()
    assert [len(done[i].token_ids) for i in range(2)] == [30, 3]
    assert len(tries) == 1, tries  # one try beside gen_a's row (in the step both were admitted), not one a step
    assert engine.metrics.waits.labels(budget="memory")._value.get() >= 29  # it still counts as waiting at every step


def test_memory_reports_the_running_batchs_gathered_rows(serve_registry):
    """The per-row factors a batch of several adapters gathers from the pools are memory too (rows × pool width at
    each layer): /health reports them beside what the budget bounds, and a batch of one adapter (views) has none."""
    router = Router.from_registry(serve_registry, quantization="none", dtype="fp32")
    router.run([{"adapter": a, "prompt": "ab"} for a in ("gen_a", "gen_b")])  # both resident
    ids = [[5, 9, 14], [40, 41], [7, 8, 9, 10]]
    router.bank.forward(ids, ["gen_a"] * 3)
    assert router.memory()["batch_row_bytes"] == 0  # one slot serves every row: views of the pool
    router.bank.forward(ids, ["gen_a", "gen_b", "gen_a"])
    want = 0
    for layer in router.bank._lora.values():
        rank, width = layer._pool[0].shape[2], layer.in_features + layer.out_features
        want += 3 * rank * width * 4  # three rows, each its A and B at the pool's rank, fp32
    assert want > 0 and router.memory()["batch_row_bytes"] == want
    mem = router.memory()
    assert mem["total_bytes"] == mem["adapter_bytes"] + mem["stack_bytes"]  # what the budget bounds is unchanged


def test_a_prefix_adapters_virtual_tokens_count_in_its_cache_reservation(serve_registry):
    """A prefix-tuning adapter's virtual tokens sit in its row's cache: the KV budget counts prompt + virtual + new
    tokens, so a request that fits only without them is refused with its numbers, not admitted over the budget."""
    from adapterhub_lite.serving.engine import Engine
    from adapterhub_lite.serving.jobs import Job
    from adapterhub_lite.serving.params import SamplingParams

    router = Router.from_registry(serve_registry, quantization="none", dtype="fp32")
    ids, new = [5, 9, 14, 3], 4
    virtual = router.virtual_tokens("gen_prefix")[1]
    assert virtual >= 2
    engine = Engine(router, budgets=Budgets(max_rows=4, max_kv_tokens=len(ids) + new + virtual - 1))
    done = {}

    def hear(event, payload):
        if event in ("done", "error"):
            done["result"] = payload
    engine._waiting.put_nowait(Job({"adapter": "gen_prefix", "prompt_ids": ids}, hear, SamplingParams(max_tokens=new, ignore_eos=True)))
    while not done:
        engine._serve_once()
    assert isinstance(done["result"], AdapterHubError) and "cache positions" in str(done["result"]), done["result"]


@pytest.mark.parametrize("name", ["cls_a", "cls_prefix", "cls_prompt"])
def test_a_classification_reserves_a_row_of_cache_per_label_it_scores(serve_registry, name):
    """The labels are several tokens each, so a request is scored as one sequence per label (2), each of prompt +
    longest label: a budget of one such sequence was passed (the pass held twice it). It is refused with its numbers,
    and served under a budget of both. A prefix or prompt adapter's virtual tokens sit in each sequence's cache too
    (a prefix's were left out: cls_prefix was admitted 2 × 3 positions over the budget)."""
    from adapterhub_lite.serving.engine import Engine
    from adapterhub_lite.serving.jobs import Job
    from adapterhub_lite.serving.params import SamplingParams

    router = Router.from_registry(serve_registry, quantization="none", dtype="fp32")
    longest, sequences = router.label_shape(name)
    assert sequences == 2
    width = len(router.prepare({"text": "ab"}, name).ids) + router.virtual_tokens(name)[1] + longest
    for budget, ok in ((width * sequences - 1, False), (width * sequences, True)):
        engine, done = Engine(router, budgets=Budgets(max_rows=4, max_kv_tokens=budget)), {}
        engine._waiting.put_nowait(Job({"adapter": name, "text": "ab"}, lambda event, payload, done=done: done.setdefault("r", payload)
                                       if event in ("done", "error") else None, SamplingParams()))
        while not done:
            engine._serve_once()
        if ok:
            assert done["r"].label in ("pos", "neg"), done["r"]
        else:
            assert isinstance(done["r"], AdapterHubError) and f"2 sequences (one per label) of {width} cache positions" in str(done["r"]), done["r"]


def test_a_newcomer_never_evicts_the_adapter_of_a_prompt_part_way_through_its_pieces(serve_registry):
    """Admission keeps resident the adapters the batch holds. It listed the half-prefilled prompts that get a piece in
    the plan, safe only because today's scheduler admits no newcomer in a step that gives such a prompt no piece. A
    plan that did (another scheduling policy) let a newcomer evict gen_a under a prompt with pieces still to run, whose
    next piece then ran through gen_b's slot. Every half-prefilled prompt's adapter is kept now: the newcomer waits,
    and both are answered as alone."""
    from adapterhub_lite.serving.engine import Engine
    from adapterhub_lite.serving.jobs import Job
    from adapterhub_lite.serving.params import SamplingParams
    from adapterhub_lite.serving.scheduler import Plan

    probe = Router.from_registry(serve_registry, quantization="none", dtype="fp32")
    probe.hold(["gen_b"])
    router = Router.from_registry(serve_registry, quantization="none", dtype="fp32",
                                  memory_budget_mb=probe.resident_bytes() * 1.2 / 2**20)  # one adapter at a time
    for name in ("gen_a", "gen_b"):
        router.fetch(name)
    requests = [("gen_a", list(range(5, 17))), ("gen_b", [5, 9, 14])]  # 12 tokens: three pieces of 4
    alone = []
    for adapter, ids in requests:
        out = {}
        engine = Engine(router, budgets=Budgets(max_rows=4, max_num_batched_tokens=4))
        engine._waiting.put_nowait(Job({"adapter": adapter, "prompt_ids": ids}, lambda e, p, out=out: out.setdefault(e, p),
                                       SamplingParams(max_tokens=4, ignore_eos=True)))
        while "done" not in out and "error" not in out:
            engine._serve_once()
        alone.append(out["done"].token_ids)
    engine, done = Engine(router, budgets=Budgets(max_rows=4, max_num_batched_tokens=4)), {}
    for i, (adapter, ids) in enumerate(requests):
        engine._waiting.put_nowait(Job({"adapter": adapter, "prompt_ids": ids}, lambda e, p, i=i: done.setdefault(i, p) if e in ("done", "error") else None,
                                       SamplingParams(max_tokens=4, ignore_eos=True)))
        if i == 0:
            engine._serve_once()  # the long prompt's first piece: gen_a resident, 8 positions to go
    engine._intake()
    long, new = next(iter(engine.scheduler.prefilling.values())), engine.scheduler.waiting[0]
    assert long.prefilled == 4 and list(router.resident) == ["gen_a"], router.resident
    # a plan that admits the newcomer whole and gives the half-prefilled prompt no piece this step
    engine.scheduler.waiting.remove(new)
    engine.scheduler.prefilling[new.key] = new
    new.prefilled = new.prompt_tokens
    engine._admit(Plan(decode=0, prefill=[(new, new.prompt_tokens)]))
    assert list(router.resident) == ["gen_a"] and engine.scheduler.waiting[0] is new  # it waits for gen_a's prompt
    while len(done) < 2:
        engine._serve_once()
    assert [done[i].token_ids for i in range(2)] == alone


@pytest.mark.parametrize("static, new", [(False, 5), (True, 1)])
def test_the_kv_count_bounds_the_cache_a_prefix_row_beside_a_long_prompt_holds(serve_registry, static, new):
    """A pass lays each row out as the longest prefix (gen_prefix: 2 virtual tokens in the cache), then the longest
    prompt (gen_prompt: 5 virtual + 25 tokens): 2 rows × 32 columns, and the dynamic batch grows a column a step for
    both. The scheduler counted rows × the widest row, 2 × (30 + new): a budget of that admitted both together, whose
    prefill held 64 > 62 (1 new token) and dynamic batch 72 > 70 (5). Now the count (and its gauge) bounds every pass
    and batch measured here, and under that budget the two run one after the other."""
    from adapterhub_lite.serving.decoding import Decoding
    from adapterhub_lite.serving.engine import Engine
    from adapterhub_lite.serving.jobs import Job
    from adapterhub_lite.serving.params import SamplingParams

    router = Router.from_registry(serve_registry, quantization="none", dtype="fp32")
    assert router.virtual_tokens("gen_prefix") == ("PREFIX_TUNING", 2) and router.virtual_tokens("gen_prompt") == ("PROMPT_TUNING", 5)
    for name in ("gen_prefix", "gen_prompt"):
        router.fetch(name)  # read already: both are ready at the first step, so they may share a pass
    for budget in (None, 2 * (30 + new)):
        engine, done, held = Engine(router, budgets=Budgets(max_rows=4, max_kv_tokens=budget), static_decode=static), {}, []
        start = router.bank.start

        def measured(input_ids, adapters, start=start, held=held, engine=engine, **kw):
            new = start(input_ids, adapters, **kw)
            held.append((new.cache.layers[0].keys.shape[0] * new.cache.layers[0].keys.shape[2], engine.scheduler.kv_reserved()))
            return new
        router.bank.start = measured
        try:
            for i, (name, ids) in enumerate([("gen_prefix", [5]), ("gen_prompt", list(range(5, 30)))]):
                engine._waiting.put_nowait(Job({"adapter": name, "prompt_ids": ids}, lambda e, p, i=i, done=done: done.setdefault(i, p) if e in ("done", "error") else None,
                                               SamplingParams(max_tokens=new, ignore_eos=True)))
            while len(done) < 2:
                engine._serve_once()
                if isinstance(engine._dec, Decoding):  # the dynamic batch; static buffers are sized within the budget themselves
                    keys = engine._dec.cache.layers[0].keys
                    held.append((keys.shape[0] * keys.shape[2], engine.scheduler.kv_reserved()))
                assert engine.metrics.kv_reserved._value.get() == engine.scheduler.kv_reserved()
        finally:
            router.bank.start = start
        assert all(not isinstance(r, Exception) for r in done.values()), done
        assert held and all(h <= r for h, r in held), held
        if budget is None:
            assert (64, 2 * (2 + 30 + new)) in held  # one pass of both rows: 2 × (2 + 30) held, 2 × (2 + 30 + new) counted
        else:
            assert all(r <= budget for _, r in held), held


def test_rows_joining_a_dynamic_batch_hold_no_columns_of_rows_that_left(serve_registry):
    """On the dynamic path a prefill joined the running batch right-padded to the other side's width: after a1
    (20-token prompt, its 3 decode columns) left, its columns stayed, under b1's prompt, and a2 and b1 decoded behind
    all of them: 2 × 62 positions held against 2 × (21 + 40) counted. Joined rows are compacted now (each row's own
    columns first): what the batch holds stays within the count at every step."""
    from adapterhub_lite.serving.decoding import Decoding
    from adapterhub_lite.serving.engine import Engine
    from adapterhub_lite.serving.jobs import Job
    from adapterhub_lite.serving.params import SamplingParams

    router = Router.from_registry(serve_registry, quantization="none", dtype="fp32")
    engine, done, held = Engine(router, budgets=Budgets(max_rows=4), static_decode=False), {}, []

    def submit(i, ids, new):
        engine._waiting.put_nowait(Job({"prompt_ids": ids}, lambda e, p, i=i: done.setdefault(i, p) if e in ("done", "error") else None,
                                       SamplingParams(max_tokens=new, ignore_eos=True)))
    submit("a1", list(range(5, 25)), 8)
    submit("a2", [5], 60)
    for _ in range(3):
        engine._serve_once()
    submit("b1", list(range(5, 26)), 40)
    while len(done) < 3:
        engine._serve_once()
        if isinstance(engine._dec, Decoding):
            keys = engine._dec.cache.layers[0].keys
            held.append((keys.shape[0] * keys.shape[2], engine.scheduler.kv_reserved()))
    assert all(not isinstance(r, Exception) for r in done.values()), done
    assert all(h <= r for h, r in held), [x for x in held if x[0] > x[1]]


@pytest.mark.parametrize("name", ["cls_a", "cls_prefix", "cls_prompt"])
def test_a_classification_that_fits_the_context_but_for_its_longest_labels_last_token_is_answered(serve_registry, name):
    """Scoring runs the prompt and each label but its last token, which is read, never fed: the pass's rows are
    prompt + longest label - 1 (+ a prompt adapter's virtual tokens). The context check asked for the whole label, so
    a request of exactly the context was refused though its pass fits; one position more is still refused."""
    from adapterhub_lite.core.errors import ContextLengthError

    probe = Router.from_registry(serve_registry, quantization="none", dtype="fp32")
    longest, _ = probe.label_shape(name)
    runs = len(probe.prepare({"text": "ab"}, name).ids) + probe.virtual_tokens(name)[1] + longest - 1
    assert longest > 1
    router = Router.from_registry(serve_registry, quantization="none", dtype="fp32", max_model_len=runs)
    assert router.run([{"adapter": name, "text": "ab"}])[0]["prediction"] in ("pos", "neg")
    tight = Router.from_registry(serve_registry, quantization="none", dtype="fp32", max_model_len=runs - 1)
    with pytest.raises(ContextLengthError, match=f"needs {runs} tokens .* {longest - 1} for the longest label's tokens but its last"):
        tight.run([{"adapter": name, "text": "ab"}])
